"""Quality per CPU second: train each model for a fixed number of seconds, then score it with the evaluation
the pipeline runs (both feature spaces, bootstrap bands) on the validation split, so settings are compared at
equal training time. A benchmark chooses settings, so it never reads the test split: that is the report's.

    python benchmarks/quality_at_fixed_clock.py --models wgan gan --seconds 86 \
        --set models.wgan.ema_decay=0.999 --label ema --out artifacts/bench.json

Each model's epochs are chosen to fill `--seconds` of training on this machine: 30 steps are timed first
(not counted), then epochs = round(seconds / (seconds per step x steps per epoch)), at least 1; the seconds
the training really took are printed beside the metrics. With `--seconds 0` the params' own epochs are used.
`--raw-too` also scores the raw weights of a run with `ema_decay` > 0 (the same run, the weights before the
moving average replaces them), so the two are compared on the same training.

Where a family has a peer's recipe (benchmarks/peer_recipes.py: the PyTorch examples VAE, PyTorch-GAN's GAN
and WGAN-GP), that recipe is then trained for the seconds the project's model took and scored the same way,
and the two are printed side by side with their bands (`--no-baselines` skips them). Needs the DVC outputs
data/prepared and models/evaluator (`dvc repro reference`). Time only on an idle machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import peer_recipes
import torch
import yaml
from bench_common import (
    ROOT,
    Harness,
    add_profile_option,
    add_run_options,
    device_from,
    family_params,
    load_params,
    prepare_model,
    timed,
)

from mnistgen import data, evaluation, profiles, training
from mnistgen.config import EvaluateParams, ParamsError, section
from mnistgen.models import build_model
from mnistgen.utils import memory_format, seed_everything

SHOWN = [
    ("fid_cls", "FID e1"),
    ("fid_cls_e2", "FID e2"),
    ("precision", "prec e1"),
    ("precision_e2", "prec e2"),
    ("recall", "rec e1"),
    ("recall_e2", "rec e2"),
]


def apply_sets(params: dict, sets: list[str]) -> dict:
    """`a.b.c=value` overrides (YAML values), as `dvc exp run -S` writes them into params.yaml; merged as a
    profile is (mnistgen.profiles.merge), so a key params.yaml lacks is refused."""
    params = copy.deepcopy(params)
    for item in sets:
        key, _, value = item.partition("=")
        override = yaml.safe_load(value)
        for part in reversed(key.split(".")):
            override = {part: override}
        try:
            profiles.merge(params, override)
        except ParamsError as err:
            raise SystemExit(f"--set {item}: {str(err).removeprefix('profile: ')}") from err
    return params


def epochs_for(params, train_x, device, seed: int, seconds: float, steps: int = 300) -> int:
    """Epochs of this model that fill `seconds` on this machine, from `steps` timed steps after 10 warm-up
    steps, in the memory format training uses (30 steps misjudged a WGAN epoch by 60 %, 100 a wide one by 35 %)."""
    channels_last = memory_format(device) == torch.channels_last
    model, optimizers, _ = prepare_model(params, device, seed, compile_=False, channels_last=channels_last)
    runner = Harness(model, optimizers, train_x, seed)
    runner.run(10)
    elapsed, _ = timed(runner, steps)
    steps_per_epoch = training.batches(len(train_x), params.batch_size)
    epoch_seconds = elapsed / steps * steps_per_epoch
    print(f"{params.family}: {epoch_seconds:.2f} s per epoch (from {steps} timed steps)", flush=True)
    return max(1, round(seconds / epoch_seconds))


def score(model, evaluator: Path, prepared: Path, p: EvaluateParams, device) -> dict[str, float]:
    """The evaluate stage's measurement on the validation split only."""
    return evaluation.measure(model, evaluator, prepared, p, device, splits=("val",))[0]["val"]


def train_and_score(build, params, train_x, train_y, val_xy, p: EvaluateParams, args) -> tuple[float, list[tuple[str, dict]]]:
    """Build the model of `params` with `build` after seeding (as the train stage does, so the same seed gives the
    same run), train it with the project's harness and score it on validation; with --raw-too and a moving
    average, the raw weights of the same run are scored too."""
    seed_everything(args.seed)
    device = train_x.device  # where the data already is
    model = build(params).to(device)
    raw: dict = {}  # the last raw weights, before the moving average replaces them
    started = time.perf_counter()
    training.train(
        model,
        train_x,
        val_xy[0],
        seed=args.seed,
        raw_weights=raw,
        progress=True,
        train_labels=train_y,
        val_labels=val_xy[1],
    )
    seconds = time.perf_counter() - started
    rows = [(args.label, score(model, args.evaluator, args.data, p, device))]
    if args.raw_too and model.params.ema_decay > 0:
        model.averaged().load_state_dict(raw)
        model.fit_prior(train_x)
        rows.append((f"{args.label} (raw weights)", score(model, args.evaluator, args.data, p, device)))
    return seconds, rows


def band(metrics: dict, key: str) -> str:
    """A figure with its 95 % bootstrap band, or with its standard error where it has one instead (IWAE NLL)."""
    if key + "_stderr" in metrics:
        return f"{metrics[key]:.3f} ± {metrics[key + '_stderr']:.3f}"
    return f"{metrics[key]:.3f} [{metrics.get(key + '_lo', float('nan')):.3f}, {metrics.get(key + '_hi', float('nan')):.3f}]"


def report(name: str, label: str, epochs: int, seconds: float, metrics: dict, args) -> None:
    """One line per scored model, and one JSON line in --out."""
    shown = "  ".join(f"{title} {band(metrics, k)}" for k, title in SHOWN)
    extra = f"  IWAE NLL {metrics['iwae_nll']:.2f}" if "iwae_nll" in metrics else ""
    extra += f"  label fidelity {metrics['label_fidelity']:.3f}" if "label_fidelity" in metrics else ""
    print(f"{name:6s} {label:28s} epochs {epochs:3d}  train {seconds:6.1f} s  {shown}{extra}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        row = {"model": name, "label": label, "epochs": epochs, "train_seconds": seconds, "sets": args.sets}
        with open(args.out, "a") as f:
            f.write(json.dumps({**row, "threads": torch.get_num_threads(), **metrics}) + "\n")


def side_by_side(name: str, ours: dict, peer_name: str, peer: dict) -> None:
    """Ours beside the peer's recipe at the same seconds, each with its 95 % band; for a lower-is-better
    distance, how many times the baseline's ours is."""
    print(f"{name}: ours vs {peer_name}, the same training seconds, validation split", flush=True)
    for key, title in [*SHOWN, ("iwae_nll", "IWAE NLL")]:
        if key not in ours or key not in peer:
            continue
        ratio = f"  baseline / ours {peer[key] / ours[key]:.2f}x" if key.startswith(("fid", "iwae")) else ""
        print(f"  {title:9s} ours {band(ours, key):26s} baseline {band(peer, key):26s}{ratio}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="keys of params.yaml's models")
    parser.add_argument("--seconds", type=float, default=0.0, help="training seconds per model (0 = the params' epochs)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="a params override, e.g. models.gan.lr=0.0003")
    parser.add_argument("--label", default="defaults", help="the name of this configuration in the output")
    parser.add_argument("--raw-too", action="store_true", help="also score the raw weights of a run with ema_decay > 0")
    parser.add_argument(
        "--no-baselines", dest="baselines", action="store_false", help="skip the peers' recipes (benchmarks/peer_recipes.py)"
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data/prepared")
    parser.add_argument("--evaluator", type=Path, default=ROOT / "models/evaluator")
    parser.add_argument("--out", type=Path, help="append the results (JSON lines) to this file")
    add_run_options(parser)
    add_profile_option(parser)
    args = parser.parse_args()
    device = device_from(args)
    all_params = apply_sets(load_params(args.profile), args.sets)
    p = EvaluateParams(**section(all_params, "evaluate"))

    train, val = (data.load_split(args.data, s) for s in ("train", "val"))
    train_x, train_y = data.to_float(train.images, device), train.labels.to(device)
    val_xy = (data.to_float(val.images, device), val.labels.to(device))

    for name in args.models:
        params = family_params(all_params, name)
        if args.seconds:
            params = params.model_copy(update={"epochs": epochs_for(params, train_x, device, args.seed, args.seconds)})
        seconds, rows = train_and_score(build_model, params, train_x, train_y, val_xy, p, args)
        for label, metrics in rows:
            report(name, label, params.epochs, seconds, metrics, args)
        recipe = peer_recipes.baseline(params.family) if args.baselines else None
        if recipe is None:
            continue
        # The peer's recipe gets the seconds ours took, filled with its own epochs (its steps cost otherwise).
        peer_name, peer = recipe
        peer = peer.model_copy(update={"epochs": epochs_for(peer, train_x, device, args.seed, seconds)})
        peer_seconds, [(_, peer_metrics)] = train_and_score(peer_recipes.build_baseline, peer, train_x, train_y, val_xy, p, args)
        report(name, f"baseline: {peer_name}", peer.epochs, peer_seconds, peer_metrics, args)
        side_by_side(name, rows[0][1], peer_name, peer_metrics)


if __name__ == "__main__":
    main()
