"""Data-parallel training (mnistgen.distributed): N gloo processes on this CPU equal one process fed the
same global batches, for every family; a rank that dies fails the torchrun stage at once, and the
run resumes from its checkpoint."""

import copy
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from ddp_cases import CASES, data, params
from helpers import ROOT, free_port, tiny_model_params, write_params, write_prepared
from mlflow import MlflowClient
from torch import nn

from mnistgen import distributed, training
from mnistgen.models import build_model
from mnistgen.utils import StageError, seed_everything

WORLD = 2
TOLERANCE = 1e-5  # max |weight difference| after 32 steps (3.6e-7 at most seen): float rounding differs, nothing else may
RUN_SECTION = {
    "grade": "default",
    "seed": 0,
    "device": "cpu",
    "deterministic": True,
    "experiment": "test-exp",
    "sample_every": 1,
    "dist_timeout_s": 60,
}


# ------------------------------------------------------------------ one process


GLOO_LOST_PEER = "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:51234: Connection reset by peer"


class FailingAllReduce(torch.autograd.Function):
    """A collective in a backward pass whose peer is gone: what the global batch norm's all-reduce meets."""

    @staticmethod
    def forward(ctx, t):
        return t * 1

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(GLOO_LOST_PEER)


def test_a_lost_peer_in_a_backward_pass_is_told_apart_from_a_bug():
    """autograd re-raises a backward's error without the frames that raised it, so nothing of torch.distributed is left
    in its traceback: the message must tell a lost peer apart (else rank 0 prints gloo's raw traceback)."""
    x = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError) as raised:
        FailingAllReduce.apply(x).sum().backward()
    frames = [f.filename for f in traceback.extract_tb(raised.value.__traceback__)]
    assert not any("torch/distributed/" in f for f in frames)  # the frame-based check alone would miss it
    assert distributed.from_collective(raised.value)
    assert distributed.brief(raised.value) == "Read error [127.0.0.1]:51234: Connection reset by peer"
    assert not distributed.from_collective(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 2x2)"))


def test_the_ranks_slices_make_up_the_global_batch(monkeypatch):
    batch = torch.arange(12)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    slices = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        slices.append(distributed.local_rows(batch))
    assert torch.equal(torch.cat(slices), batch) and [len(s) for s in slices] == [4, 4, 4]


def test_without_a_process_group_draws_and_batches_are_unchanged():
    torch.manual_seed(0)
    expected = torch.randn(5, 3)
    torch.manual_seed(0)
    with distributed.training_step():
        assert torch.equal(distributed.rows(5, lambda m: torch.randn(m, 3)), expected)
    assert torch.equal(distributed.local_rows(torch.arange(64)), torch.arange(64))


def test_a_batch_size_the_processes_cannot_share_is_an_error(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(StageError, match="batch_size 64 is not divisible by the 3 processes"):
        distributed.local_rows(torch.arange(64))


@pytest.fixture
def one_rank_group():
    """A gloo group of one process: the collectives run, and sum over one rank."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("shape", [(8, 6), (8, 6, 5, 5)])
def test_global_batch_norm_is_batch_norm(one_rank_group, shape):
    """Forward, input and parameter gradients, running statistics and eval mode as torch's own layer's."""
    torch.manual_seed(0)
    theirs = nn.BatchNorm1d(6) if len(shape) == 2 else nn.BatchNorm2d(6)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5), theirs.bias.uniform_(-1, 1)
    ours = nn.Sequential(copy.deepcopy(theirs))
    distributed.global_batch_norm(ours, torch.device("cpu"))
    assert isinstance(ours[0], distributed.GlobalBatchNorm)
    x = torch.randn(shape) * 3 + 1
    weights = torch.randn(shape)  # a loss whose gradient differs per element
    for _ in range(2):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = ours(a), theirs(b)
        torch.testing.assert_close(out_a, out_b)
        (out_a * weights).sum().backward()
        (out_b * weights).sum().backward()
        torch.testing.assert_close(a.grad, b.grad)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours[0].state_dict()[key], value)
    torch.testing.assert_close(ours[0].weight.grad, theirs.weight.grad)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))


# ------------------------------------------------------------------ N processes against one


def one_process_reference(family: str, changes: dict) -> nn.Module:
    """The same case trained by training.train in this one process: the batches are the global ones. It runs on WORLD
    threads, one per rank, so that its reductions split each batch as the ranks do: a GAN's training amplifies a
    different summation order (one thread against two ranks) past the tolerance within a few steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(WORLD)
    try:
        seed_everything(0, deterministic=True)
        model = build_model(params(family, **changes))
        images, labels, val_images, val_labels = data()
        training.train(model, images, val_images, seed=0, progress=False, train_labels=labels, val_labels=val_labels)
    finally:
        torch.set_num_threads(threads)
    return model


@pytest.fixture(scope="module")
def parallel_weights(tmp_path_factory) -> Path:
    """Every case trained by two gloo processes (tests/ddp_worker.py); rank 0's weights, one file per case."""
    out = tmp_path_factory.mktemp("ddp")
    env = {
        **os.environ,
        "WORLD_SIZE": str(WORLD),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "ddp_worker.py"), str(out)],
            cwd=ROOT,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_reach_the_weights_of_one(parallel_weights, case):
    """Every float in the state dict, with no exceptions: no parameter has a gradient that is zero in exact
    arithmetic (layers before a batch norm and Wasserstein critic outputs have no bias), so none may drift."""
    family, changes = CASES[case]
    parallel = torch.load(parallel_weights / f"{case}.pt", weights_only=True)
    reference = one_process_reference(family, changes).state_dict()
    seed_everything(0, deterministic=True)
    initial = build_model(params(family, **changes)).state_dict()
    assert parallel.keys() == reference.keys()
    floats = [k for k, v in reference.items() if v.is_floating_point()]
    diff, worst = max(((parallel[k] - reference[k]).abs().max().item(), k) for k in floats)
    moved = max((reference[k] - initial[k]).abs().max().item() for k in floats)
    print(f"\n{case}: max |2-process - 1-process weight| = {diff:.3g} ({worst}; weights moved up to {moved:.3g})")
    assert moved > 100 * TOLERANCE  # the comparison means something: training changed the weights
    assert diff < TOLERANCE, f"{case}: 2-process weights differ from 1-process ones by up to {diff:.3g} ({worst})"
    for k in reference.keys() - set(floats):  # batch norm's step counters
        assert torch.equal(parallel[k], reference[k]), k


# ------------------------------------------------------------------ the stage under torchrun


def workspace(folder: Path, empty_store: Path, **train) -> Path:
    """A tiny GAN (batch norm, two networks) to train for 2 epochs of 8 steps on 2 processes."""
    folder.mkdir()
    shutil.copy(empty_store, folder / "mlflow.db")
    write_prepared(folder / "data" / "prepared", n_train=256)
    write_params(folder, train={**RUN_SECTION, **train}, models={"gan": tiny_model_params("gan", epochs=2, batch_size=32)})
    return folder


def torchrun(work: Path, module: str, model: str, timeout: float, **env) -> tuple[subprocess.CompletedProcess, float]:
    args = [model, "--data", "data/prepared", "--out", f"models/{model}", "--curves", f"curves/{model}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", "-m", module, *args]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        **env,
    }
    started = time.monotonic()
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    return result, time.monotonic() - started


@pytest.mark.slow
def test_torchrun_stage_fails_at_once_when_a_rank_dies_and_then_resumes(tmp_path, empty_store):
    """Reference: an uninterrupted 2-process run. Then rank 1 dies in epoch 2: the command exits non-zero
    within seconds, naming the rank; run again, it resumes after epoch 1 and ends at the reference's weights."""
    result, _ = torchrun(workspace(tmp_path / "reference", empty_store), "mnistgen.stages.train", "gan", timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "gan epoch 2/2" in result.stdout and result.stdout.count("gan epoch 1/2") == 1  # rank 0 alone prints
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'reference'}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("test-exp").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags["world_size"] == "2"  # rank 0 alone logs

    work = workspace(tmp_path / "interrupted", empty_store)
    result, seconds = torchrun(work, "ddp_die", "gan", timeout=300, DIE_RANK="1", DIE_STEP="10")
    print(f"died after {seconds:.1f} s:", result.stderr[-3000:])
    assert result.returncode != 0 and seconds < 120
    assert "RuntimeError" not in result.stderr  # rank 0, if it sees the loss before torchrun stops it, says so in one line
    assert "gan epoch 1/2" in result.stdout and "gan epoch 2/2" not in result.stdout  # 8 steps an epoch: died in epoch 2
    assert "rank: 1" in result.stderr and "exitcode: 3" in result.stderr  # torchrun's summary names the dead rank
    assert not (work / "models" / "gan").exists()

    result, _ = torchrun(work, "mnistgen.stages.train", "gan", timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from checkpoints/gan/last.pt after epoch 1" in result.stdout
    reference = torch.load(tmp_path / "reference" / "models" / "gan" / "weights.pt", weights_only=True)
    resumed = torch.load(work / "models" / "gan" / "weights.pt", weights_only=True)
    for key, value in reference.items():
        assert torch.equal(value, resumed[key]), key


@pytest.mark.slow
def test_a_hung_rank_fails_the_run_after_the_timeout(tmp_path, empty_store):
    """Rank 1 stops in epoch 2 without exiting: rank 0's next all-reduce gives up after dist_timeout_s."""
    work = workspace(tmp_path / "hung", empty_store, dist_timeout_s=10)
    result, seconds = torchrun(work, "ddp_die", "gan", timeout=300, DIE_RANK="1", DIE_STEP="10", HANG="1")
    print(f"failed after {seconds:.1f} s:", result.stderr[-3000:])
    assert result.returncode != 0 and seconds < 120
    assert "error: rank 0 of 2: lost the other processes of the run" in result.stderr
    assert "exitcode: 1" in result.stderr and "rank: 0" in result.stderr  # rank 0 is the root cause torchrun names
