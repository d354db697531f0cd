"""Shared by the benchmark scripts: options, params, CUDA sync, the harness (training's own step loop), the per-sample baseline, torch.compile.

The scripts run as files (`python benchmarks/benchmark_train.py`): Python puts a script's own
folder first on sys.path, so they import this module as `bench_common` with no path edits.
mnistgen itself must be importable: installed (pip install -e .), or on a bare GPU box
PYTHONPATH=src, as gpu_session.sh sets.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import yaml

from mnistgen import config, models, profiles, training
from mnistgen.models import build_model
from mnistgen.utils import pick_device, seed_everything, training_dtype

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


# ---------------------------------------------------------------------------- options and params


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """--device, --threads and --seed, the same in every benchmark."""
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0 = torch's default); on a busy shared CPU 1 can be much faster than 2",
    )
    parser.add_argument("--seed", type=int, default=0)


def add_profile_option(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument(
        "--profile",
        "--params",
        dest="profile",
        default=default,
        help="a profile applied to params.yaml as `mnistgen profile` does (e.g. "
        f"params-paper.yaml); 'none' = params.yaml as it is (default: {default or 'none'})",
    )


def device_from(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    return pick_device(args.device)


def load_params(profile: str | None) -> dict:
    """params.yaml with `profile` applied (mnistgen.profiles.load_profiled), as plain dicts."""
    if profile in (None, "", "none") or Path(profile).resolve() == PARAMS.resolve():
        return profiles.load_profiled(None, PARAMS)
    try:
        return profiles.load_profiled(profile, PARAMS)
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("ruamel"):
            raise
        # A bare GPU box has no ruamel.yaml (it keeps params.yaml's comments, which a read does not
        # need): the same merge, with the same errors, on PyYAML's plain dicts.
        overrides = yaml.safe_load(Path(profile).read_text()) or {}
        return profiles.merge(yaml.safe_load(PARAMS.read_text()), overrides)


def family_params(all_params: dict, name: str, **changes) -> config.ModelParams:
    """Section models.<name> as its family's params class, with `changes` (e.g. batch_size=64) applied."""
    where = f"models.{name}"
    return models.model_params({**config.section(all_params, where), **changes}, where)


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work: the benchmarks call it only at timing boundaries."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- models


def prepare_model(params: config.ModelParams, device: torch.device, seed: int, compile_: bool, channels_last: bool):
    """A freshly seeded model on `device` in train mode, its optimizers, and the names of its compiled submodules."""
    seed_everything(seed)
    model = build_model(params).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_:
        torch._dynamo.reset()  # a fresh cache: all compiled modules share Module._call_impl's recompile limit
    compiled = training.compile_in_place(model) if compile_ else []
    model.train()
    return model, model.make_optimizers(), compiled


# ---------------------------------------------------------------------------- ours


class Harness(training.Stepper):
    """training.train's own step loop (training.Stepper), run a given number of steps at a time, with the
    params' learning-rate schedule; a conditional family gets the digits 0..9 in turn (any do for speed)."""

    def __init__(
        self, model, optimizers, train_images: torch.Tensor, seed: int, label: str = "ours", precision: str | None = None
    ):
        p = model.params
        per_epoch = training.batches(len(train_images), p.batch_size)
        labels = torch.arange(len(train_images), device=train_images.device) % 10 if model.conditional else None
        super().__init__(
            model,
            train_images,
            optimizers,
            training.schedules(optimizers, per_epoch, p.epochs, p.lr_warmup, p.lr_decay),
            torch.Generator().manual_seed(seed),
            labels,
            dtype=training_dtype(train_images.device, precision or p.precision),
        )
        self.label, self.device = label, train_images.device

    @property
    def images_seen(self) -> int:
        return self.global_step * self.batch_size

    def mean_losses(self) -> dict[str, float]:
        return {k: v.item() for k, v in self.take_means().items()}  # a host sync: call it off the clock

    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.mean_losses().values())


def timed(runner: Harness, steps: int) -> tuple[float, int]:
    """Seconds and images for `steps` steps; CUDA is synchronised only here, at the two boundaries."""
    sync(runner.device)
    seen = runner.images_seen
    started = time.perf_counter()
    runner.run(steps)
    sync(runner.device)
    return time.perf_counter() - started, runner.images_seen - seen


# ---------------------------------------------------------------------------- the baseline's data


class PerSampleMNIST(torch.utils.data.Dataset):
    """torchvision.datasets.MNIST-style: one uint8 image -> PIL image -> float tensor [1, 28, 28]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        from PIL import Image
        from torchvision.transforms import functional as TF

        self.images, self.labels = images.numpy(), labels.numpy()
        self._image, self._to_tensor = Image, TF.to_tensor

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self._image.fromarray(self.images[index])  # uint8 [28, 28] -> mode "L"
        return self._to_tensor(image), int(self.labels[index])
