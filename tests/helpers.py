"""Small builders shared by the tests: tiny prepared data, tiny params, workspaces, scripts by path."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from mnistgen.models import model_params

ROOT = Path(__file__).resolve().parents[1]


def write_prepared(folder: Path, n_train=256, n_val=64, n_test=128, seed=0) -> None:
    """Synthetic 'digits': a bright bar whose position encodes the label (the team drills' own)."""
    # imported here: the DDP worker script imports this module without the repo root on its path
    from mnistgen.team.drills import write_synthetic_digits

    write_synthetic_digits(folder, {"train": n_train, "val": n_val, "test": n_test}, seed)


def repo_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


# The repo's evaluate and evaluator sections, shrunk for tiny synthetic data (every key params.yaml has stays).
TINY_EVALUATE = {
    "num_samples": 256,
    "per_class_samples": 10,
    "num_real": 128,
    "batch_size": 128,
    "kid_subsets": 2,
    "kid_subset_size": 64,
    "is_splits": 2,
    "interp_pairs": 4,
    "interp_steps": 3,
    "iwae_k": 4,
    "iwae_images": 16,
    "bootstrap": 10,
}
TINY_EVALUATOR = {"epochs": 1, "batch_size": 64, "shift_pixels": 0, "min_val_accuracy": 0.0}
TINY_PINNED = "evaluators/tiny"  # where pin_tiny_evaluators puts its version, relative to the workspace


def tiny_evaluation_sections() -> dict:
    """Sections evaluate, evaluator and evaluator2 of params.yaml with the TINY_* changes, for write_params;
    the evaluators are the ones pin_tiny_evaluators trains on the workspace's synthetic digits."""
    params = repo_params()
    return {
        "evaluate": {**params["evaluate"], **TINY_EVALUATE, "evaluators": TINY_PINNED},
        "evaluator": {**params["evaluator"], **TINY_EVALUATOR},
        "evaluator2": {**params["evaluator2"], **TINY_EVALUATOR},
    }


def pin_tiny_evaluators(work: Path, prepared: str = "data/prepared") -> Path:
    """A pinned evaluator version made as `mnistgen evaluator train` makes one, on the synthetic digits of
    work/prepared with one-epoch recipes (the real ruler, evaluators/v1, reads real digits only)."""
    from mnistgen import data, evaluators
    from mnistgen.config import EvaluatorParams

    folder = Path(work) / prepared
    train, val = data.load_split(folder, "train"), data.load_split(folder, "val")
    recipes = {s.section: EvaluatorParams(**{**repo_params()[s.section], **TINY_EVALUATOR}) for s in evaluators.FEATURE_SPACES}
    out = Path(work) / TINY_PINNED
    evaluators.train_pinned(
        data.to_float(train.images),
        train.labels,
        data.to_float(val.images),
        val.labels,
        recipes,
        out,
        "tiny",
        data.split_hashes(folder)["train"],
    )
    return out


def tiny_model_params(family: str, **changes) -> dict:
    """The repo's own section for `family`, shrunk to a tiny MLP that trains in a second."""
    section = repo_params()["models"][family]
    shrunk = {"arch": "mlp", "hidden": 16, "latent_dim": 4, "epochs": 1, "batch_size": 32, "lr": 0.001, **changes}
    if "critic_lr" in section:  # a GAN family: its critic as wide and as fast as the generator unless `changes` says otherwise
        shrunk = {"critic_width": shrunk.get("width", section["width"]), "critic_lr": shrunk["lr"], **shrunk}
    return {**section, **shrunk}


def tiny(family: str, **changes):
    """tiny_model_params as the family's validated params object."""
    return model_params(tiny_model_params(family, **changes), f"models.{family}")


def write_params(folder: Path, **sections) -> None:
    params = repo_params()
    params.update(sections)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium_binary() -> str:
    """Debian's chromium (CHROMIUM overrides); the calling test is skipped where there is none."""
    import os
    import shutil

    import pytest

    found = (
        os.environ.get("CHROMIUM")
        or shutil.which("chromium")
        or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    )
    if not found:
        pytest.skip("no chromium binary (install the Debian package: apt-get install -y chromium)")
    return found


def headless_chromium(
    target: str, profile: Path, budget_ms: int, window: tuple[int, int], screenshot: Path | None = None, offline: bool = False
) -> str:
    """One headless Chromium pass over `target` (a URL); returns the DOM after `budget_ms` of virtual time.

    The flags keep Chromium off this machine's closed network; `offline` also makes every host name
    unresolvable and any proxy dead, so a page that reaches for a CDN fails even where there is internet.
    """
    import subprocess

    cmd = [
        chromium_binary(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--mute-audio",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={budget_ms}",
        f"--window-size={window[0]},{window[1]}",
    ]
    if offline:
        cmd += ["--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9"]
    if screenshot:
        cmd.append(f"--screenshot={screenshot}")
    result = subprocess.run([*cmd, "--dump-dom", target], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"chromium failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return result.stdout


@contextlib.contextmanager
def served_model(model_uri: str, env: dict | None = None, startup_s: float = 90):
    """`mlflow models serve` (the CLI a user runs, --env-manager local) on a free loopback port; yields the port."""
    port = free_port()
    bin_dir = os.path.dirname(sys.executable)  # mlflow and the uvicorn it starts live beside this python
    env = {**os.environ, **(env or {}), "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    server = subprocess.Popen(
        [
            os.path.join(bin_dir, "mlflow"),
            "models",
            "serve",
            "-m",
            model_uri,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + startup_s
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                assert time.time() < deadline, f"mlflow models serve not up after {startup_s} s"
                time.sleep(0.5)
        yield port
        assert server.poll() is None, "the server died while serving"
    finally:
        server.terminate()
        server.wait(timeout=30)


def post_invocation(port: int, body: bytes | dict) -> tuple[int, bytes]:
    """POST to a served model's /invocations; (HTTP status, body), errors included."""
    body = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def git(*args: str, cwd: Path) -> None:
    """A git command as a throw-away committer."""
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args], cwd=cwd, check=True, capture_output=True)


def enter_world(world: Path, folder: Path) -> None:
    """The world's data, pinned evaluators and references, copied into a test's folder."""
    for name in ("data", "evaluators", "models"):
        shutil.copytree(world / name, folder / name)
