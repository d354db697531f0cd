"""One prepared check for a GPU machine: does the project's training path work there, and how fast?

Usage (from the repo root; needs only torch, numpy, PyYAML, pydantic, tqdm: no dvc, no mlflow;
where mnistgen is not installed, prefix PYTHONPATH=src):
    python benchmarks/gpu_check.py                            # cuda, params.yaml with the params-paper.yaml profile
    python benchmarks/gpu_check.py --mnist shared/mnist       # no data/prepared: build the splits from the .gz files
    python benchmarks/gpu_check.py --device cpu --steps 5     # a quick dry run on a CPU
    python benchmarks/gpu_check.py --compile                  # also a bf16 + torch.compile row per model

What it does, in order (sized to stay well under 8 minutes on an H100; --budget-seconds skips
the rest once it is spent):
  1. prints torch / CUDA / cuDNN versions and the device;
  2. loads real MNIST: data/prepared/{train,val}.pt if present, else the four official .gz
     files in --mnist (read with mnistgen.data.read_pair, MNIST_MIRROR set to that folder,
     split with make_splits and the prepare section), and moves the training set to the device once;
  3. per model (section models.<name> of params.yaml with --profile applied, in memory, as
     `mnistgen profile` does), with its batch size: the project's harness
     (bench_common.Harness, training.train's inner loop: device tensor, seeded randperm per
     epoch, slices, training.schedules, then the one step, training.step) for --warmup +
     --steps steps, under training.step's bf16 autocast and again in fp32 (that autocast
     off), each on a freshly built model; CUDA is synchronised only at the timing
     boundaries; reports images/s, ms/step,
     the implied 55,000-image epoch time, whether every loss stayed finite, and the peak GPU
     memory of the measurement;
  4. one real mnistgen.training.train(...) call: 1 epoch of the AE (models.ae, --profile applied) on
     the device, with validation and fit_prior, to prove the full loop works there;
  5. a compact table; with $OUT set (or --json) the results also go to a JSON file.
Exit status 1 if any loss was not finite or a step failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from bench_common import ROOT, Harness, add_profile_option, family_params, load_params, prepare_model, sync, timed

from mnistgen import config, data, training
from mnistgen.models import build_model
from mnistgen.utils import memory_format, pick_device, seed_everything

EPOCH_IMAGES = 55_000
GZ = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def default_profile() -> str | None:
    paper = ROOT / "params-paper.yaml"
    return str(paper) if paper.exists() else None


def mnist_candidates(given: str | None) -> list[Path]:
    if given:
        return [Path(given)]
    out = [Path(os.environ["MNIST_MIRROR"])] if os.environ.get("MNIST_MIRROR", "").strip() else []
    return out + [ROOT / "shared" / "mnist", ROOT.parent / "shared" / "mnist"]


def load_mnist(prepared: Path, mnist: str | None, all_params: dict) -> tuple[data.Split, data.Split, str]:
    """(train, val) splits and where they came from."""
    if (prepared / "train.pt").exists() and (prepared / "val.pt").exists():
        return data.load_split(prepared, "train"), data.load_split(prepared, "val"), str(prepared)
    for folder in mnist_candidates(mnist):
        if (folder / GZ["train"][0]).exists():
            os.environ["MNIST_MIRROR"] = str(folder)  # read_pair's default reader checks every MD5
            train = data.read_pair(*GZ["train"])
            test = data.read_pair(*GZ["test"])
            params = config.validate_section(config.PrepareParams, config.section(all_params, "prepare"), "prepare")
            splits = data.make_splits(train, test, params)
            return splits["train"], splits["val"], f"{folder} (split with params.yaml's prepare section)"
    tried = ", ".join(str(p) for p in [prepared, *mnist_candidates(mnist)])
    raise SystemExit(f"error: no MNIST found (tried {tried}); pass --mnist FOLDER with the four official .gz files")


def harness_steps(
    params: config.ModelParams, train_images: torch.Tensor, steps: int, warmup: int, seed: int, use_autocast: bool, compile_: bool
) -> dict:
    """Warm-up + timed steps of training.train's inner loop (training.step) on a fresh model; one host sync at the end."""
    device = train_images.device
    channels_last = memory_format(device) == torch.channels_last  # as training.train does
    model, optimizers, _ = prepare_model(params, device, seed, compile_, channels_last)
    harness = Harness(model, optimizers, train_images, seed, precision="bf16" if use_autocast else "fp32")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    warm_seconds, _ = timed(harness, warmup)
    harness.take_means()  # forget the warm-up's losses
    seconds, images = timed(harness, steps)
    means = harness.mean_losses()  # the one host sync, after the clock stopped
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del model, optimizers, harness
    return {
        "seconds": seconds,
        "warmup_seconds": warm_seconds,
        "images_per_second": images / seconds,
        "ms_per_step": 1000 * seconds / steps,
        "epoch_seconds": EPOCH_IMAGES * seconds / images,
        "finite": all(math.isfinite(v) for v in means.values()),
        "losses": means,
        "peak_gib": peak,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) | cuda:N | cpu (a dry run) | auto")
    add_profile_option(parser, default_profile())
    parser.add_argument("--prepared", default=str(ROOT / "data" / "prepared"), help="prepared splits, used when present")
    parser.add_argument("--mnist", default=None, help="folder with the four official MNIST .gz files (when no --prepared)")
    parser.add_argument("--models", nargs="+", default=None, help="models (keys of params.yaml's models; default: all)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (at least n_critic + 1)")
    parser.add_argument("--no-fp32", action="store_true", help="skip the fp32 (autocast off) rows")
    parser.add_argument("--compile", action="store_true", help="also a bf16 + torch.compile row per family (slower check)")
    parser.add_argument("--train-epochs", type=int, default=1, help="epochs of the real training.train AE run (0 = skip)")
    parser.add_argument("--budget-seconds", type=float, default=420, help="skip what is left once this much time is spent")
    parser.add_argument("--json", default=None, help="write results here (default: $OUT/gpu_check.json when $OUT is set)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    t0 = time.perf_counter()
    device = pick_device(args.device)
    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}, "
        f"cuda available: {torch.cuda.is_available()}"
    )
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        device_name = torch.cuda.get_device_name(device)
        print(
            f"device {device}: {device_name}, {prop.total_memory / 2**30:.1f} GiB, capability {prop.major}.{prop.minor}, "
            f"{prop.multi_processor_count} SMs, bf16 supported: {torch.cuda.is_bf16_supported()}"
        )
    else:
        device_name = f"cpu, {torch.get_num_threads()} threads"
        print(f"device {device} ({device_name}): a dry run; autocast is a no-op on CPU, so 'bf16' rows are fp32 here")
    all_params = load_params(args.profile)
    args.models = args.models or list(all_params["models"])
    profile = Path(args.profile).name if args.profile not in (None, "", "none") else None
    print(f"params: {profile} merged onto params.yaml" if profile else "params: params.yaml")

    started = time.perf_counter()
    train_split, val_split, source = load_mnist(Path(args.prepared), args.mnist, all_params)
    train_images = data.to_float(train_split.images, device)  # the whole set, once
    val_images = data.to_float(val_split.images, device)
    sync(device)
    if device.type == "cuda":
        assert train_images.is_cuda and val_images.is_cuda, "training data is not on the GPU"
    print(
        f"data: {source}: train {tuple(train_images.shape)} val {tuple(val_images.shape)} on {train_images.device}, "
        f"loaded in {time.perf_counter() - started:.1f} s"
    )

    variants = [("bf16", True, False)]
    if not args.no_fp32:
        variants.append(("fp32", False, False))
    if args.compile:
        variants.append(("bf16+compile", True, True))

    rows, failures, skipped = [], [], []
    for family in args.models:
        params = family_params(all_params, family)
        warmup = max(args.warmup, getattr(params, "n_critic", 1) + 1)
        for label, use_amp, comp in variants:
            if time.perf_counter() - t0 > args.budget_seconds:
                skipped.append(f"{family} {label}")
                continue
            try:
                r = harness_steps(params, train_images, args.steps, warmup, args.seed, use_amp, comp)
            except Exception as err:  # noqa: BLE001 - report and go on with the next check
                traceback.print_exc()
                failures.append(f"{family} {label}: {type(err).__name__}: {err}")
                continue
            r.update(family=family, precision=label, batch_size=params.batch_size, arch=params.arch, width=params.width)
            rows.append(r)
            if not r["finite"]:
                failures.append(f"{family} {label}: non-finite loss {r['losses']}")
            losses = ", ".join(f"{k} {v:.4g}" for k, v in r["losses"].items())
            print(
                f"{family:<5} {label:<12} bs {params.batch_size:>4}: {r['images_per_second']:>9.0f} img/s, "
                f"{r['ms_per_step']:7.2f} ms/step, warm-up {r['warmup_seconds']:.1f} s, peak {r['peak_gib']:.2f} GiB; {losses}",
                flush=True,
            )

    train_result = None
    if args.train_epochs > 0 and "ae" in all_params["models"]:
        if time.perf_counter() - t0 > args.budget_seconds:
            skipped.append("training.train ae")
        else:
            params = family_params(all_params, "ae", epochs=args.train_epochs)
            seed_everything(args.seed)
            model = build_model(params).to(device)
            print(
                f"\nmnistgen.training.train: ae, {args.train_epochs} epoch(s), batch {params.batch_size}, on {device}", flush=True
            )
            started = time.perf_counter()
            try:
                history = training.train(model, train_images, val_images, seed=args.seed, checkpoint=None, progress=False)
                sync(device)
                train_result = {"total_seconds": time.perf_counter() - started, **history[-1]}
                print(
                    f"train() done: epoch {history[-1]['epoch_seconds']:.2f} s, {history[-1]['images_per_second']:.0f} img/s, "
                    f"whole call {train_result['total_seconds']:.2f} s, val_loss {history[-1].get('val_loss', float('nan')):.4g}"
                )
            except Exception as err:  # noqa: BLE001
                traceback.print_exc()
                failures.append(f"training.train ae: {type(err).__name__}: {err}")

    print(
        f"\nSummary on {device} ({device_name}), params {profile or 'params.yaml'}, {args.steps} timed steps per row, "
        f"epoch s = {EPOCH_IMAGES:,} images / (img/s):"
    )
    header = (
        f"{'model':<5} {'precision':<12} {'batch':>5} | {'img/s':>9} {'ms/step':>8} {'epoch s':>8} | {'peak GiB':>8} | finite"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['family']:<5} {r['precision']:<12} {r['batch_size']:>5} | {r['images_per_second']:>9.0f} {r['ms_per_step']:>8.2f} "
            f"{r['epoch_seconds']:>8.2f} | {r['peak_gib']:>8.2f} | {'yes' if r['finite'] else 'NO'}"
        )
    by = {(r["family"], r["precision"]): r for r in rows}
    ratios = [
        f"{f} {by[(f, 'bf16')]['images_per_second'] / by[(f, 'fp32')]['images_per_second']:.2f}x"
        for f in args.models
        if (f, "bf16") in by and (f, "fp32") in by
    ]
    if ratios:
        print("bf16 / fp32 throughput: " + ", ".join(ratios))
    if train_result:
        print(
            f"training.train ae: {train_result['epoch_seconds']:.2f} s per epoch "
            f"({train_result['images_per_second']:.0f} img/s), {train_result['total_seconds']:.2f} s with validation + fit_prior"
        )
    if skipped:
        print(f"skipped (over --budget-seconds {args.budget_seconds:.0f}): {', '.join(skipped)}")
    for failure in failures:
        print(f"FAILED: {failure}")
    print(f"{'OK' if not failures else 'FAILED'}: total {time.perf_counter() - t0:.1f} s")

    out = args.json or (str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(
            json.dumps(
                {
                    "torch": torch.__version__,
                    "cuda": torch.version.cuda,
                    "device": str(device),
                    "device_name": device_name,
                    "params": profile or "params.yaml",
                    "steps": args.steps,
                    "rows": rows,
                    "train": train_result,
                    "failures": failures,
                    "skipped": skipped,
                    "total_seconds": time.perf_counter() - t0,
                },
                indent=2,
                default=float,
            )
            + "\n"
        )
        print(f"results: {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
