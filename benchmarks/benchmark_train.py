"""Training throughput: the project's harness against a plain per-sample DataLoader baseline.

Usage (from the repo root):
    python benchmarks/benchmark_train.py                         # every model in params.yaml, auto device
    python benchmarks/benchmark_train.py --models vae gan --steps 50 --device cpu
    python benchmarks/benchmark_train.py --profile params-paper.yaml --device cuda --compile --channels-last on
    python benchmarks/benchmark_train.py --variants eager channels_last compile --repeats 5 --skip-baseline

For each model (section `models.<name>` of params.yaml, with --profile applied as
`mnistgen profile` does, but only in memory) it times the same number of
`model.train_step` calls two ways, on the same device, with the same batch size:

  ours        the project's harness: training.train's inner loop (bench_common.Harness) around
              the one step, training.step: the whole training set is one float tensor on the
              device, each epoch draws a seeded randperm and batches are slices of it
              (training.batches per epoch); training.schedules set the learning rate, then
              training.step runs train_step under utils.autocast at the model's precision
              (utils.training_dtype: auto is bf16 on CPUs with AMX, else fp32); the model in
              utils.memory_format(device) (channels_last on CPU); losses are summed on the device, never read in the loop.
  DataLoader  a typical MNIST tutorial: a per-sample Dataset whose __getitem__ turns one
              uint8 image into a PIL image and then a float tensor
              (torchvision.transforms.functional.to_tensor), DataLoader(batch_size,
              shuffle=True, num_workers=0), each batch moved to the device; the same
              model, memory format and train_step under the same autocast (use
              --baseline-fp32 to drop it) at a constant learning rate, so the speed-up is the
              data path's (ours also pays training.train's per-step learning-rate update).

Each method runs --warmup steps first (not timed; at least n_critic + 1, so a GAN's generator
step is warm/compiled too), then --repeats rounds of --steps timed steps, alternating the two
methods, and the best round of each is reported; CUDA is synchronised only at the two timing
boundaries of a round. The epoch time is implied for the 55,000-image training split:
55,000 / (images per second).

With --variants, the harness itself is timed once per variant instead (eager, channels_last,
compile, compile+channels_last at the model's precision; channels_last+fp32 and channels_last+bf16 to compare
the precisions), each variant on its own copy of the same initial model, in
alternating rounds in one process so that machine noise hits every variant alike; the table
gives each variant's median and best round and its median relative to eager.

Needs only torch, torchvision (for the baseline's to_tensor), numpy, PyYAML, pydantic and tqdm.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_common import (
    ROOT,
    Harness,
    PerSampleMNIST,
    add_profile_option,
    add_run_options,
    device_from,
    family_params,
    load_params,
    prepare_model,
    sync,
    timed,
)

from mnistgen import data, training
from mnistgen.utils import memory_format, training_dtype

EPOCH_IMAGES = 55_000
VARIANTS = {  # name -> (compile, channels_last, precision: None = the model's own)
    "eager": (False, False, None),
    "channels_last": (False, True, None),
    "compile": (True, False, None),
    "compile+channels_last": (True, True, None),
    "channels_last+fp32": (False, True, "fp32"),
    "channels_last+bf16": (False, True, "bf16"),
}


# ---------------------------------------------------------------------------- baseline


class LoaderBaseline(Harness):
    """A tutorial's loop, deliberately not the harness's batches: DataLoader(per-sample Dataset, shuffle=True),
    each batch moved to the device, then the same step (training.Stepper.run), at a constant learning rate."""

    def __init__(
        self, model, optimizers, split: data.Split, device: torch.device, seed: int, precision: str | None, workers: int
    ):
        # The Stepper's own batches are never drawn (next_batch below): a single batch stands in for its images.
        training.Stepper.__init__(
            self,
            model,
            data.to_float(split.images[: model.params.batch_size], device),
            optimizers,
            [],
            torch.Generator(),
            dtype=training_dtype(device, precision or model.params.precision),
        )
        self.label, self.device = "DataLoader", device
        self.loader = torch.utils.data.DataLoader(
            PerSampleMNIST(split.images, split.labels),
            batch_size=model.params.batch_size,
            shuffle=True,
            num_workers=workers,
            generator=torch.Generator().manual_seed(seed),
        )
        self.batches = iter(self.loader)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        try:
            x, labels = next(self.batches)
        except StopIteration:  # a new epoch
            self.batches = iter(self.loader)
            x, labels = next(self.batches)
        return x.to(self.device), labels.to(self.device) if self.model.conditional else None


# ---------------------------------------------------------------------------- main


def print_variants(rows, args, device, name) -> None:
    print(
        f"\nHarness throughput by variant on {device} ({name}): {args.steps} timed steps per round, "
        f"{args.repeats} alternating rounds; images/s median (best), and median relative to eager"
    )
    header = f"{'model':<6} {'batch':>5} | " + " | ".join(f"{v:>24}" for v in args.variants) + " | finite"
    print(header)
    print("-" * len(header))
    for family, bs, per_variant, finite in rows:
        eager = statistics.median(per_variant["eager"]) if "eager" in per_variant else None
        cells = []
        for variant in args.variants:
            median, best = statistics.median(per_variant[variant]), max(per_variant[variant])
            relative = f" {median / eager:5.2f}x" if eager else ""
            cells.append(f"{median:>7.0f} ({best:>6.0f}){relative:>7}")
        print(f"{family:<6} {bs:>5} | " + " | ".join(f"{c:>24}" for c in cells) + f" | {'yes' if finite else 'NO'}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="keys of params.yaml's models to measure (default: all)")
    add_profile_option(parser)
    parser.add_argument("--prepared", default=str(ROOT / "data" / "prepared"), help="folder with train.pt")
    add_run_options(parser)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before each measurement")
    parser.add_argument("--batch-size", type=int, default=0, help="override every model's batch size (0 = params)")
    parser.add_argument("--compile", action="store_true", help="torch.compile submodules in place (never a WGAN critic)")
    parser.add_argument(
        "--channels-last",
        choices=["auto", "on", "off"],
        default="auto",
        help="model in channels_last memory format (auto = as training.train does: on for CPU)",
    )
    parser.add_argument("--baseline-fp32", action="store_true", help="run the DataLoader baseline without autocast")
    parser.add_argument("--baseline-workers", type=int, default=0, help="DataLoader num_workers for the baseline")
    parser.add_argument("--skip-baseline", action="store_true", help="time only the project's harness")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=None,
        help="time the harness once per variant (no DataLoader baseline), e.g. eager channels_last compile",
    )
    parser.add_argument("--repeats", type=int, default=1, help="alternating timed rounds per method; the best is reported")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = device_from(args)
    args.channels_last = {"on": True, "off": False}.get(args.channels_last, memory_format(device) == torch.channels_last)
    split = data.load_split(args.prepared, "train")
    train_images = data.to_float(split.images, device)  # once, as the harness does
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, device {device} ({name}), {len(train_images)} training images")
    print(
        f"options: compile={'on' if args.compile else 'off'}, channels_last={'on' if args.channels_last else 'off'}, "
        f"precision: each model's own (auto = {training_dtype(device, 'auto')}), "
        f"baseline precision={'fp32' if args.baseline_fp32 else 'as ours'}, "
        f"baseline workers={args.baseline_workers}, {args.steps} timed steps after {args.warmup} warm-up, "
        f"best of {args.repeats} alternating round(s)"
    )

    all_params = load_params(args.profile)
    rows, variant_rows = [], []
    for family in args.models or list(all_params["models"]):
        params = family_params(all_params, family, **({"batch_size": args.batch_size} if args.batch_size else {}))
        bs = params.batch_size
        warmup = max(args.warmup, getattr(params, "n_critic", 1) + 1)  # at least one generator step: it compiles and warms too
        print(f"\n{family}: {params.arch}, width {params.width}, latent {params.latent_dim}, batch {bs}", flush=True)
        runners = []
        for label in args.variants or ["ours"]:
            compile_, channels_last, precision = VARIANTS[label] if args.variants else (args.compile, args.channels_last, None)
            model, optimizers, compiled = prepare_model(params, device, args.seed, compile_, channels_last)
            if compile_:
                print(
                    f"  {label}: compiled in place: {', '.join(compiled) or 'nothing'}"
                    + ("  (critic left eager: double backward)" if params.family == "wgan" else "")
                )
            runners.append(Harness(model, optimizers, train_images, args.seed, label=label, precision=precision))
        if not (args.skip_baseline or args.variants):  # a second copy of the same initial model
            model, optimizers, _ = prepare_model(params, device, args.seed, args.compile, args.channels_last)
            runners.append(
                LoaderBaseline(
                    model, optimizers, split, device, args.seed, "fp32" if args.baseline_fp32 else None, args.baseline_workers
                )
            )
        rounds: dict[str, list[tuple[float, int]]] = {runner.label: [] for runner in runners}
        for runner in runners:
            started = time.perf_counter()
            runner.run(warmup)
            sync(device)
            print(f"  {runner.label:<10} warm-up {time.perf_counter() - started:6.1f} s", flush=True)
        for r in range(args.repeats):  # alternate, so a noisy neighbour hurts both the same way
            for runner in runners:
                seconds, images = timed(runner, args.steps)
                print(
                    f"  {runner.label:<10} round {r + 1}: {images / seconds:9.0f} img/s, {1000 * seconds / args.steps:8.2f} ms/step",
                    flush=True,
                )
                rounds[runner.label].append((seconds, images))
        finite = all(runner.finite() for runner in runners)
        if args.variants:
            variant_rows.append((family, bs, {label: [i / s for s, i in r] for label, r in rounds.items()}, finite))
            continue
        best = {label: min(r) for label, r in rounds.items()}
        rows.append((family, bs, best.get("ours"), best.get("DataLoader"), finite))
        del runners, model, optimizers
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.variants:
        print_variants(variant_rows, args, device, name)
        return
    print(
        f"\nTraining throughput on {device} ({name}): {args.steps} timed steps per cell, best of {args.repeats}; "
        f"compile {'on' if args.compile else 'off'}, channels_last {'on' if args.channels_last else 'off'}"
    )
    header = (
        f"{'model':<6} {'device':<6} {'batch':>5} | {'ours img/s':>10} {'DL img/s':>9} {'speed-up':>8} | "
        f"{'ours ms/step':>12} {'DL ms/step':>10} | {'ours epoch s':>12} {'DL epoch s':>10} | finite"
    )
    print(header)
    print("-" * len(header))
    for family, bs, ours, base, finite in rows:
        o_ips, o_ms = ours[1] / ours[0], 1000 * ours[0] / args.steps
        if base:
            b_ips, b_ms = base[1] / base[0], 1000 * base[0] / args.steps
            rest = (
                f"{b_ips:>9.0f} {o_ips / b_ips:>7.2f}x | {o_ms:>12.2f} {b_ms:>10.2f} | "
                f"{EPOCH_IMAGES / o_ips:>12.2f} {EPOCH_IMAGES / b_ips:>10.2f}"
            )
        else:
            rest = f"{'-':>9} {'-':>8} | {o_ms:>12.2f} {'-':>10} | {EPOCH_IMAGES / o_ips:>12.2f} {'-':>10}"
        print(f"{family:<6} {device.type:<6} {bs:>5} | {o_ips:>10.0f} {rest} | {'yes' if finite else 'NO'}")
    print(
        f"epoch s = {EPOCH_IMAGES:,} images / (img/s). DL = per-sample Dataset (PIL + to_tensor) + "
        f"DataLoader(shuffle=True, num_workers={args.baseline_workers}); same model, optimiser, train_step, batch size."
    )


if __name__ == "__main__":
    main()
