"""The benchmark scripts still run and report what they claim to (on tiny synthetic splits; no timing asserted)."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_PINNED, pin_tiny_evaluators, tiny_evaluation_sections, tiny_model_params, write_params, write_prepared

from mnistgen import data

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each script is a subprocess that imports torch and trains a little


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
    """`python benchmarks/<script>` from the repo root, as the README shows it."""
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--device", "cpu", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def test_time_to_elbo_runs_the_harness_with_its_schedule(prepared):
    out = run("vae_time_to_elbo.py", "--prepared", prepared, "--target", 1e9, "--sweep", "64:1e-2:2", "128:5e-3:0")
    # a target of 1e9 nats is reached at the first check, after epoch 1, by every run
    assert re.search(r"baseline \(DataLoader, bs 128, lr 1e-3\): [0-9.]+ s, 1 epochs", out), out
    assert "0.5-epoch warm-up to lr 0.01, linear decay to 0 at epoch 2, log-odds output bias" in out
    assert "constant lr 0.005" in out
    assert re.search(r"^ +64 +0\.01 +2 \| +[0-9.]+ s \| +1 \|", out, re.MULTILINE), out
    assert re.search(r"^ +128 +0\.005 +const \| +[0-9.]+ s \| +1 \|", out, re.MULTILINE), out
    assert re.search(r"speed-up inside the clocks: [0-9.]+x", out), out
    # each run stops on the validation split; the test figure of its weights is reported after the clocks
    assert "epoch 1:" in out and "validation -ELBO" in out and re.search(r"validation -ELBO [0-9.]+, test -ELBO [0-9.]+", out), (
        out
    )


def test_time_to_elbo_times_the_baseline_alone_for_a_whole_process_comparison(prepared):
    out = run("vae_time_to_elbo.py", "--prepared", prepared, "--target", 1e9, "--skip-ours")
    assert re.search(r"baseline \(DataLoader, bs 128, lr 1e-3\): [0-9.]+ s, 1 epochs", out), out
    assert "ours:" not in out and "ours (" not in out, out


def test_the_gate_error_rate_benchmark_prints_each_metrics_rate_and_power():
    out = subprocess.run(
        [sys.executable, "benchmarks/gate_error_rate.py", "--models", "gan", "vae", "--rounds", "400"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| gan") or line.startswith("| vae")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("gan", "fid_cls"), ("gan", "fid_cls_e2"), ("vae", "iwae_nll")]
    for r in rows:
        rate, power_5 = float(r[8]), float(r[14])
        assert 0 <= rate <= 0.2 and 0 <= power_5 <= 1


def test_benchmark_variants_table_has_every_variant(prepared):
    out = run(
        "benchmark_train.py",
        "--prepared",
        prepared,
        "--models",
        "ae",
        "--steps",
        2,
        "--warmup",
        1,
        "--repeats",
        2,
        "--variants",
        "eager",
        "channels_last",
    )
    row = next(line for line in out.splitlines() if line.startswith("ae "))
    assert row.count("x |") == 2 and " 1.00x " in row and row.endswith("yes"), row


def test_benchmark_against_the_dataloader_reads_the_profile(prepared, tmp_path):
    profile = tmp_path / "profile.yaml"
    profile.write_text("models:\n  gan: {batch_size: 32, width: 8}\n")
    out = run("benchmark_train.py", "--prepared", prepared, "--models", "gan", "--profile", profile, "--steps", 2, "--warmup", 1)
    assert "gan: conv, width 8, latent 32, batch 32" in out, out
    assert re.search(r"^gan +cpu +32 \| +[0-9]+ +[0-9]+ +[0-9.]+x \|.* \| yes$", out, re.MULTILINE), out


def test_gpu_check_dry_run_on_cpu(prepared):
    out = run("gpu_check.py", "--prepared", prepared, "--profile", "none", "--models", "ae", "wgan", "--steps", 2, "--warmup", 1)
    for model in ("ae", "wgan"):
        for precision in ("bf16", "fp32"):
            assert re.search(rf"^{model} +{precision} +(128|64) \|.*\| yes$", out, re.MULTILINE), out
    assert "training.train ae:" in out and "val_loss" in out
    assert re.search(r"^OK: total", out, re.MULTILINE), out


@pytest.fixture(scope="module")
def evaluated_world(tmp_path_factory):
    """Synthetic digits and the evaluator folder the real reference stage makes of them (tiny pinned classifiers)."""
    work = tmp_path_factory.mktemp("clock")
    write_prepared(work / "data/prepared")
    write_params(work, **tiny_evaluation_sections())
    pin_tiny_evaluators(work)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mnistgen.stages.reference",
            "--data",
            "data/prepared",
            "--evaluators",
            TINY_PINNED,
            "--out",
            "models/evaluator",
            "--metrics",
            "metrics/evaluator.json",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return work


def test_quality_at_fixed_clock_fills_the_seconds_and_scores_both_spaces(evaluated_world, tmp_path):
    work = evaluated_world
    profile = tmp_path / "tiny.yaml"
    profile.write_text(
        yaml.safe_dump(
            {"models": {m: tiny_model_params(m) for m in ("gan", "vae")}, "evaluate": tiny_evaluation_sections()["evaluate"]}
        )
    )
    rows_file = tmp_path / "rows.jsonl"
    out = run(
        "quality_at_fixed_clock.py",
        "--models",
        "gan",
        "vae",
        "--seconds",
        2,
        "--profile",
        profile,
        "--set",
        "models.gan.ema_decay=0.9",
        "--raw-too",
        "--label",
        "tiny",
        "--data",
        work / "data/prepared",
        "--evaluator",
        work / "models/evaluator",
        "--out",
        rows_file,
    )
    rows = {(r["model"], r["label"]): r for r in map(json.loads, rows_file.read_text().splitlines())}
    gan_peer, vae_peer = ("gan", "baseline: PyTorch-GAN gan"), ("vae", "baseline: PyTorch examples VAE")
    assert set(rows) == {("gan", "tiny"), ("gan", "tiny (raw weights)"), ("vae", "tiny"), gan_peer, vae_peer}, rows.keys()
    for model in ("gan", "vae"):
        assert re.search(rf"^{model}: [0-9.]+ s per epoch \(from 300 timed steps\)$", out, re.MULTILINE), out
    for (model, label), row in rows.items():
        if label.startswith("baseline"):
            continue  # below
        # 2 s of a tiny MLP is many epochs: the clock, not the profile's `epochs: 1`, chose them
        assert row["epochs"] > 1 and row["sets"] == ["models.gan.ema_decay=0.9"], row
        assert row["split"] == "val", row  # a benchmark chooses settings: it is scored on validation, never on test
        for key in ("fid_cls", "fid_cls_e2", "precision", "precision_e2", "recall", "recall_e2"):
            assert math.isfinite(row[key]) and row[key + "_lo"] <= row[key] <= row[key + "_hi"], (key, row)
        assert re.search(
            rf"^{model} +{re.escape(label)} +epochs +{row['epochs']} +train +[0-9.]+ s +FID e1 "
            rf"{row['fid_cls']:.3f} \[",
            out,
            re.MULTILINE,
        ), out
    assert math.isfinite(rows["vae", "tiny"]["iwae_nll"]) and "IWAE NLL" in out
    # the raw weights are the same run's before the average replaced them: other weights, other scores
    assert rows["gan", "tiny (raw weights)"]["fid_cls"] != rows["gan", "tiny"]["fid_cls"]
    assert rows["gan", "tiny (raw weights)"]["epochs"] == rows["gan", "tiny"]["epochs"]
    # each peer's recipe trained for about the seconds ours took (its own epochs fill them) and scored the same way,
    # then printed beside ours with both bands
    for peer, ours in ((gan_peer, rows["gan", "tiny"]), (vae_peer, rows["vae", "tiny"])):
        row = rows[peer]
        assert row["split"] == "val" and row["epochs"] >= 1 and row["protocol"] == ours["protocol"], row
        assert row["fid_cls"] != ours["fid_cls"], (row, ours)  # another network, not a copy of ours
        assert re.search(
            rf"^  FID e1 +ours {ours['fid_cls']:.3f} \[[0-9.]+, [0-9.]+\] +baseline {row['fid_cls']:.3f} \[[0-9.]+, [0-9.]+\] +"
            rf"baseline / ours {row['fid_cls'] / ours['fid_cls']:.2f}x$",
            out,
            re.MULTILINE,
        ), out
    assert math.isfinite(rows[vae_peer]["iwae_nll"]) and re.search(r"^  IWAE NLL +ours .* baseline / ours", out, re.MULTILINE)


def test_quality_at_fixed_clock_names_a_bad_override():
    result = subprocess.run(
        [sys.executable, "benchmarks/quality_at_fixed_clock.py", "--models", "gan", "--set", "models.gan.no_such_key=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "models.gan.no_such_key is not a key of params.yaml" in result.stderr, result.stderr


PEER_CHECK = """
import json, torch
import peer_recipes
from torch import nn

out = {}
for family in ("gan", "wgan"):
    name, params = peer_recipes.baseline(family)
    model = peer_recipes.build_baseline(params)
    linears = lambda net: [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, nn.Linear)]
    norms = [m.eps for m in model.generator.modules() if isinstance(m, nn.BatchNorm1d)]
    seen = []
    model.critic.register_forward_hook(lambda module, args, result: seen.append(args[0].detach()))
    real = torch.zeros(8, 1, 28, 28)
    real[:, :, :14] = 1.0  # half black, half white: [0, 1] as the harness gives every model
    torch.manual_seed(0)
    optimizers = model.make_optimizers()
    for step in range(params.n_critic if family == "wgan" else 1):
        model.train_step(real, optimizers, step)
    first = seen[0]  # the critic's first call of the first step scores the real batch
    images = model.sample(4)
    out[family] = {
        "name": name,
        "generator": linears(model.generator),
        "critic": linears(model.critic),
        "bn_eps": norms,
        "lr": [params.lr, params.critic_lr],
        "betas": list(params.betas),
        "batch": params.batch_size,
        "latent": params.latent_dim,
        "n_critic": getattr(params, "n_critic", 1),
        "gp": getattr(params, "gp_weight", 0.0),
        "critic_real_range": [first.min().item(), first.max().item()],
        "fakes_below_zero": any(bool((s < 0).any()) for s in seen[1:]),
        "sample_range": [images.min().item(), images.max().item()],
    }
name, params = peer_recipes.baseline("vae")
vae = peer_recipes.build_baseline(params)
before = vae.decoder[-2].bias.clone()
vae.init_from_data(torch.full((4, 1, 28, 28), 0.9))
out["vae"] = {"name": name, "hidden": params.hidden, "latent": params.latent_dim, "lr": params.lr, "batch": params.batch_size,
              "decay": params.lr_decay, "binarize": params.dynamic_binarization, "bias_kept": bool(torch.equal(before, vae.decoder[-2].bias))}
print(json.dumps(out))
"""


def test_peer_recipes_are_the_peers_networks_and_settings():
    """The baselines are PyTorch-GAN's networks and hyper-parameters and the PyTorch examples VAE's, and the GANs
    train on [-1, 1] images (their scaling) while handing the evaluation [0, 1] samples."""
    result = subprocess.run(
        [sys.executable, "-c", PEER_CHECK], cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    generator = [[100, 128], [128, 256], [256, 512], [512, 1024], [1024, 784]]
    for family, name in (("gan", "PyTorch-GAN gan"), ("wgan", "PyTorch-GAN wgan_gp")):
        peer = out[family]
        assert peer["name"] == name and peer["generator"] == generator, peer
        assert peer["critic"] == [[784, 512], [512, 256], [256, 1]] and peer["bn_eps"] == [0.8, 0.8, 0.8], peer
        assert peer["lr"] == [2e-4, 2e-4] and peer["betas"] == [0.5, 0.999], peer
        assert peer["batch"] == 64 and peer["latent"] == 100, peer
        assert peer["critic_real_range"] == [-1.0, 1.0], peer  # the real batch, rescaled to [-1, 1]
        assert peer["fakes_below_zero"], peer  # tanh fakes in [-1, 1] too
        assert peer["sample_range"][0] >= 0.0 and peer["sample_range"][1] <= 1.0, peer
    assert out["wgan"]["n_critic"] == 5 and out["wgan"]["gp"] == 10.0 and out["gan"]["n_critic"] == 1
    vae = out["vae"]
    assert vae["name"] == "PyTorch examples VAE" and (vae["hidden"], vae["latent"], vae["lr"], vae["batch"]) == (
        400,
        20,
        1e-3,
        128,
    )
    assert not vae["decay"] and not vae["binarize"] and vae["bias_kept"], vae  # PyTorch's default output bias
