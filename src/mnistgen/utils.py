"""Small helpers with no domain logic: devices, seeds, hashes, atomic writes, stage errors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import ParamsError


class StageError(RuntimeError):
    """An expected failure (bad input, failed check): the stage prints one line and exits non-zero."""


def accelerators() -> dict[str, bool]:
    """Which accelerators this torch build sees, in the order `auto` prefers them."""
    return {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA, then Apple's MPS, then the CPU; a named device that is not there is an error."""
    present = accelerators()
    if name == "auto":
        return torch.device(next((kind for kind, here in present.items() if here), "cpu"))
    device = torch.device(name)
    if device.type in present and not present[device.type]:
        raise StageError(f"params.yaml: train.device is {name!r} but {device.type.upper()} is not available")
    return device


def evaluation_device() -> torch.device:
    """Where measurements run: the `auto` device, except MPS, which has no float64 for the metrics' statistics
    (covariances, eigenvalues, bootstrap sums), so a Mac measures on its CPU."""
    device = pick_device("auto")
    return torch.device("cpu") if device.type == "mps" else device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def training_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype of training's matmuls and convolutions (models.<name>.precision): `fp32`, `bf16`, or `auto`: bf16 where it
    was measured faster, a CPU with AMX bf16 tiles (Intel Sapphire Rapids and later; `mnistgen bench train
    --variants channels_last+fp32 channels_last+bf16`), else fp32: on an H100 these small models are bound by kernel
    launches and bf16's casts made steps slower (docs/benchmarks.md), other CPUs emulate bf16, and MPS keeps fp32.
    Weights, optimiser states and losses stay fp32 either way: bf16 is autocast's, per op."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        if device.type == "mps":
            raise StageError("params.yaml: precision is 'bf16', which autocast does not run on MPS; use fp32 or auto")
        return torch.bfloat16
    if precision != "auto":
        raise StageError(f"params.yaml: precision is {precision!r}; it is one of auto, fp32, bf16")
    amx = device.type == "cpu" and torch.cpu.get_capabilities().get("amx_bf16", False)
    return torch.bfloat16 if amx else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to `dtype` (training_dtype's) on `device`; fp32 is no autocast at all."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CPU, where oneDNN's NHWC convolutions made a training step of every
    family 1.17-1.33x faster (benchmarks/benchmark_train.py --variants, 5 rounds); CUDA keeps the default."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format  # CUDA and MPS: the default


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` whole.

    On any exception the temporary folder is removed and `target` is left as it was,
    so a failed stage never leaves half-written outputs.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o777 & ~umask())  # mkdtemp makes it private; outputs are ordinary folders
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: str | Path, write: Callable[[Path], None], private: bool = False, owner: str | None = None) -> None:
    """`write(tmp)` a file beside `path`, then rename it over `path`: readers see the old file or the new, whole.

    The file gets the mode an ordinary file would (0666 less the umask), or with `private` 0600 from its first byte
    (mkstemp's), never a moment readable by others; `owner` (as root) is given the file before it is renamed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        if not private:
            os.fchmod(fd, 0o666 & ~umask())
        os.close(fd)
        write(Path(tmp))
        if owner and os.geteuid() == 0:
            shutil.chown(tmp, owner)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, private: bool = False, owner: str | None = None) -> None:
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    atomic_write(path, write, private, owner)


def atomic_write_text(path: str | Path, text: str, private: bool = False, owner: str | None = None) -> None:
    atomic_write_bytes(path, text.encode(), private, owner)


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def git_show(path: str, rev: str = "HEAD") -> str | None:
    """The text of `path` as committed at `rev` in the git checkout here, or None (no git, no checkout, no such file)."""
    try:
        shown = subprocess.run(["git", "show", f"{rev}:./{path}"], capture_output=True, text=True, timeout=30)  # noqa: S607
    except (OSError, subprocess.SubprocessError):
        return None
    return shown.stdout if shown.returncode == 0 else None


def run_stage(main) -> None:
    """Run a stage's main(); expected failures print one clear line and exit 1."""
    try:
        main()
    except (StageError, ParamsError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def progress_bar(iterable, desc: str, enabled: bool = True):
    """tqdm over `iterable` on a terminal; in a log (DVC, CI) nothing, since a bar there is a trail of
    carriage-return fragments: the loops print one line per epoch or stage instead."""
    return tqdm(iterable, desc=desc, leave=False, disable=not enabled or not sys.stderr.isatty(), mininterval=1)
