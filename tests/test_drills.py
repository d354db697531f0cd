"""Failure drills: kill -9 during `dvc repro` training, then resume; same seed, same results."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import tiny_model_params, write_params, write_prepared

from mnistgen.commands import smoke as smoke_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.drill]


def workspace(path):
    smoke_pipeline.make_workspace(path, None)
    write_prepared(path / "data" / "prepared", n_train=2048, n_val=128)
    (path / "data" / "validated.json").write_text("{}")  # what the validate stage writes when the data passes
    run = {
        "grade": "default",
        "seed": 0,
        "device": "cpu",
        "deterministic": True,
        "experiment": "drill",
        "sample_every": 10,
        "dist_timeout_s": 60,
    }
    write_params(
        path,
        train=run,
        models={
            **{m: tiny_model_params(m) for m in ("ae", "gan", "wgan")},
            "vae": tiny_model_params("vae", arch="conv", width=8, epochs=4, batch_size=16),
        },
    )
    return path


def train_stage(path, background=False):
    exe = os.path.join(os.path.dirname(sys.executable), "dvc")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [exe, "repro", "--single-item", "train@vae"]
    if background:
        return subprocess.Popen(
            args, cwd=path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
    return subprocess.run(args, cwd=path, env=env, capture_output=True, text=True, timeout=600)


def curves(path):
    return {p.name: p.read_text() for p in sorted((path / "curves" / "vae").glob("*.csv"))}


def test_kill_9_during_training_then_dvc_repro_resumes_to_the_same_result(tmp_path):
    reference = workspace(tmp_path / "reference")
    result = train_stage(reference)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    killed = workspace(tmp_path / "killed")
    process = train_stage(killed, background=True)
    checkpoint = killed / "checkpoints" / "vae" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if checkpoint.exists():
            state = torch.load(checkpoint, weights_only=True)
            if state["epoch"] >= 1:
                break
        time.sleep(0.2)
    assert process.poll() is None, "training finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)  # kill -9 the whole dvc + python process group
    process.wait()
    assert not (killed / "models" / "vae" / "weights.pt").exists()

    resumed = train_stage(killed)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from checkpoints/vae/last.pt after epoch" in resumed.stdout
    a = torch.load(reference / "models" / "vae" / "weights.pt", weights_only=True)
    b = torch.load(killed / "models" / "vae" / "weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert curves(reference) == curves(killed)  # same seed, same data, CPU: identical metrics


def test_corrupt_checkpoint_stops_the_stage_naming_it(tmp_path):
    path = workspace(tmp_path / "corrupt")
    (path / "checkpoints" / "vae").mkdir(parents=True)
    (path / "checkpoints" / "vae" / "last.pt").write_bytes(b"\x00" * 100)
    result = train_stage(path)
    assert result.returncode != 0
    assert "checkpoints/vae/last.pt: corrupt checkpoint" in result.stdout + result.stderr
    assert not (path / "models" / "vae" / "weights.pt").exists()
