"""The benchmark scripts still run and report what they claim to (on tiny synthetic splits; no timing asserted)."""
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from mnistgen import data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Tiny prepared splits: bright-centred noise images, so an MLP VAE's -ELBO is finite and falls."""
    folder = tmp_path_factory.mktemp("prepared")
    g = torch.Generator().manual_seed(0)
    for name, n in (("train", 512), ("val", 64), ("test", 128)):
        blob = torch.zeros(28, 28)
        blob[8:20, 8:20] = 200
        images = (blob + 40 * torch.rand(n, 28, 28, generator=g)).clamp(0, 255).to(torch.uint8)
        data.save_split(data.Split(images, torch.randint(0, 10, (n,), generator=g)), folder / f"{name}.pt")
    return folder


def run(script, *args):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def test_time_to_elbo_runs_the_harness_with_its_schedule(prepared):
    out = run("vae_time_to_elbo.py", "--device", "cpu", "--prepared", prepared, "--target", 1e9, "--sweep", "64:1e-2:2", "128:5e-3:0")
    # a target of 1e9 nats is reached at the first check, after epoch 1, by every run
    assert re.search(r"baseline \(DataLoader, bs 128, lr 1e-3\): [0-9.]+ s, 1 epochs", out), out
    assert "0.5-epoch warm-up to lr 0.01, linear decay to 0 at epoch 2, log-odds output bias" in out
    assert "constant lr 0.005" in out
    assert re.search(r"^ +64 +0\.01 +2 \| +[0-9.]+ s \| +1 \|", out, re.M), out
    assert re.search(r"^ +128 +0\.005 +const \| +[0-9.]+ s \| +1 \|", out, re.M), out
    assert re.search(r"speed-up: [0-9.]+x", out), out


def test_benchmark_variants_table_has_every_variant(prepared):
    out = run("benchmark_train.py", "--device", "cpu", "--prepared", prepared, "--models", "ae", "--steps", 2,
              "--warmup", 1, "--repeats", 2, "--variants", "eager", "channels_last")
    row = next(line for line in out.splitlines() if line.startswith("ae "))
    assert row.count("x |") == 2 and " 1.00x " in row and row.endswith("yes"), row
