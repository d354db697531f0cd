"""MNIST: fetch the four official files, verify MD5, parse IDX, split, save, load.

The source is torchvision's list of official mirrors (its download and checksum utilities
fetch and check the files), or the folder / URL prefix named by the MNIST_MIRROR environment variable
(for a machine without internet: a folder holding the four files). Prepared splits are saved as plain
tensors (uint8 images, int64 labels) and loaded back as one float tensor on the device.

The test split reports and never chooses: loading it raises unless the caller says, with
`reading_test(role)`, that it is one of the readers that report (TEST_READERS). Training, sweeps,
promotion and benchmarks that pick a setting read the validation split only.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gzip
import json
import os
import shutil
import socket
import struct
import tempfile
import urllib.error
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torchvision.datasets import MNIST
from torchvision.datasets.utils import calculate_md5, download_url

from .config import PrepareParams
from .utils import StageError

MNIST_FILES = dict(MNIST.resources)  # file name -> MD5: torchvision's own list
OFFICIAL_MIRRORS = tuple(MNIST.mirrors)
SPLITS = ("train", "val", "test")
IDX_UBYTE = 0x08
# Who may read the test split: the stages that check the data (validate) or measure it for the report (reference,
# evaluate, report), the seeds' spread beside each reported figure, and a benchmark's report after its choice is made.
TEST_READERS = ("validate", "reference", "evaluate", "report", "seeds", "benchmark report")
_test_reader: list[str] = []  # the roles that are reading it now
T = TypeVar("T")


class SplitRefused(StageError):
    """Code that chooses asked for the test split."""


@contextlib.contextmanager
def reading_test(role: str) -> Iterator[None]:
    """Within this block, `role` (one of TEST_READERS) may load the test split and its references."""
    if role not in TEST_READERS:
        raise ValueError(f"{role!r} does not read the test split; readers: {', '.join(TEST_READERS)}")
    _test_reader.append(role)
    try:
        yield
    finally:
        _test_reader.pop()


def reads_test(role: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """A function that runs inside `reading_test(role)`: a stage's main that reports."""

    def wrap(function: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(function)
        def inside(*args: Any, **kwargs: Any) -> T:
            with reading_test(role):
                return function(*args, **kwargs)

        return inside

    return wrap


def check_split_access(name: str, what: str) -> None:
    """Raise SplitRefused when `what` of the test split is asked for outside `reading_test`."""
    if name == "test" and not _test_reader:
        raise SplitRefused(
            f"{what}: the test split is read only to report ({', '.join(TEST_READERS)}); choices read the validation split"
        )


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 28, 28]
    labels: torch.Tensor  # int64 [N]


def sources() -> list[str]:
    """Where to look for the files, in order: MNIST_MIRROR if set, else the official mirrors."""
    mirror = os.environ.get("MNIST_MIRROR", "").strip()
    return [mirror] if mirror else list(OFFICIAL_MIRRORS)


def fetch(name: str, source: str, timeout: float = 30.0) -> Path:
    """The path of file `name` in a folder, or downloaded from a URL prefix (torchvision's download_url)
    into a private temporary folder that lives as long as this process."""
    if "://" not in source:
        path = Path(source) / name
        if not path.is_file():
            raise StageError(f"{path}: cannot read MNIST file (no such file)")
        return path
    url = source.rstrip("/") + "/" + name
    folder = Path(tempfile.mkdtemp(prefix="mnistgen-mnist-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # download_url sets none: a silent mirror would hang the stage
    try:
        download_url(url, folder, name)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise StageError(f"{url}: mirror unreachable ({getattr(err, 'reason', err)})") from err
    finally:
        socket.setdefaulttimeout(previous)
    return folder / name


def fetch_verified(name: str) -> bytes:
    """File `name` from the first source that has it, after checking its MD5 (torchvision's calculate_md5)."""
    errors = []
    for source in sources():
        try:
            path = fetch(name, source)
        except StageError as err:
            errors.append(str(err))
            continue
        md5 = calculate_md5(path)
        if md5 != MNIST_FILES[name]:
            raise StageError(f"{source.rstrip('/')}/{name}: MD5 {md5} does not match the official {MNIST_FILES[name]}")
        return path.read_bytes()
    raise StageError("; ".join(errors))


def parse_idx(data: bytes, name: str, expect_ndim: int) -> np.ndarray:
    """Parse a (gzipped) IDX file of unsigned bytes; every inconsistency names the file."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise StageError(f"{name}: corrupt or truncated gzip data ({err})") from err
    if len(data) < 4:
        raise StageError(f"{name}: too short for an IDX header ({len(data)} bytes)")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != IDX_UBYTE or ndim != expect_ndim:
        magic = struct.unpack(">I", data[:4])[0]
        raise StageError(
            f"{name}: wrong IDX magic number 0x{magic:08x} (expected 0x{0x800 + expect_ndim:08x}: "
            f"unsigned bytes, {expect_ndim} dimension{'s' if expect_ndim > 1 else ''})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise StageError(f"{name}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise StageError(f"{name}: IDX header says {dims} = {expected} bytes of data, file has {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_pair(images_name: str, labels_name: str, reader=fetch_verified) -> Split:
    images = parse_idx(reader(images_name), images_name, expect_ndim=3)
    labels = parse_idx(reader(labels_name), labels_name, expect_ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise StageError(f"{images_name} has {images.shape[0]} images but {labels_name} has {labels.shape[0]} labels")
    if images.shape[1:] != (28, 28):
        raise StageError(f"{images_name}: images are {images.shape[1:]}, expected 28x28")
    if labels.max(initial=0) > 9:
        raise StageError(f"{labels_name}: label {labels.max()} outside 0..9")
    return Split(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


def make_splits(train: Split, test: Split, params: PrepareParams) -> dict[str, Split]:
    """Carve a seeded validation split from train; apply the `limit_*` subsets."""
    n_train = len(train.labels) if params.limit_train == 0 else params.limit_train
    n_test = len(test.labels) if params.limit_test == 0 else params.limit_test
    if not 0 < n_train <= len(train.labels):
        raise StageError(f"params.yaml: prepare.limit_train must be 0..{len(train.labels)}, got {params.limit_train}")
    if not 0 < n_test <= len(test.labels):
        raise StageError(f"params.yaml: prepare.limit_test must be 0..{len(test.labels)}, got {params.limit_test}")
    if not 0 < params.val_size < n_train:
        raise StageError(f"params.yaml: prepare.val_size must be between 1 and {n_train - 1}, got {params.val_size}")
    generator = torch.Generator().manual_seed(params.split_seed)
    order = torch.randperm(len(train.labels), generator=generator)[:n_train]
    val_idx, train_idx = order[: params.val_size], order[params.val_size :]
    test_idx = torch.arange(len(test.labels))
    if n_test < len(test.labels):
        test_idx = torch.randperm(len(test.labels), generator=generator)[:n_test].sort().values
    pick = lambda s, i: Split(s.images[i].contiguous(), s.labels[i].contiguous())
    return {
        "train": pick(train, train_idx.sort().values),
        "val": pick(train, val_idx.sort().values),
        "test": pick(test, test_idx),
    }


def save_split(split: Split, path: Path) -> None:
    torch.save({"images": split.images, "labels": split.labels}, path)


def load_split(prepared: str | Path, name: str) -> Split:
    path = Path(prepared) / f"{name}.pt"
    check_split_access(name, str(path))
    try:
        data = torch.load(path, weights_only=True)
        return Split(data["images"], data["labels"])
    except FileNotFoundError as err:
        raise StageError(f"{path}: not found; run `dvc repro prepare` first") from err
    except Exception as err:
        raise StageError(f"{path}: cannot load prepared split ({err})") from err


def split_hashes(prepared: str | Path) -> dict[str, str]:
    """{split: sha256 of its images and labels} as the prepare stage recorded them."""
    return json.loads((Path(prepared) / "meta.json").read_text())["sha256"]


def to_float(images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28] in [0, 1], on `device` (the whole set, once)."""
    return images.to(device).unsqueeze(1).float().div_(255.0)
