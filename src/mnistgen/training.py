"""The one training loop shared by all families (the objectives differ, the loop does not).

The whole training set is one tensor on the device; each epoch draws a seeded permutation
and slices batches from it, so there is no per-sample Python or DataLoader work. Losses
stay on the device and are read once per epoch (no host sync inside the step loop). Each
epoch ends with a checkpoint, from which an interrupted run resumes. With `ema_decay` > 0 an
exponential moving average of the sampling weights (Yazıcı et al. 2019) is kept beside the
raw ones and replaces them when training ends; the checkpoint holds both, so a resume is exact. A conditional family
(`model.conditional`) also gets each batch's labels, sliced with the same permutation.

Under torchrun every rank holds the whole training set and draws the same permutation; each
takes its slice of every global batch (distributed.py says how the ranks together make the
one-process step), so the batches, and so the weights to float rounding, do not depend on
the number of processes. All ranks validate on the whole validation set (which keeps their
random generators in step), and only rank 0 prints, checkpoints and calls `on_epoch`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel

from . import distributed
from .models.base import GenerativeModel
from .utils import StageError, atomic_torch_save, autocast, memory_format, progress_bar, sha256_json, training_dtype

EpochCallback = Callable[[int, dict, GenerativeModel], None]
# A GAN's generator schedule advances on the critic's steps too, before the generator's first step.
warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")


class DivergenceError(StageError):
    """A loss became NaN or inf: training stops and nothing is saved as a finished model."""


def batches(n: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped: batch norm and the loss scale stay steady)."""
    if batch_size > n:
        raise StageError(f"batch_size {batch_size} is larger than the training set ({n} images)")
    return n // batch_size


@torch.no_grad()
def validation_losses(
    model: GenerativeModel,
    images: torch.Tensor,
    batch_size: int,
    labels: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        given = () if labels is None else (labels[start : start + batch_size],)
        with autocast(x.device, dtype):
            for key, value in model.validation_losses(x, *given).items():
                sums[key] = sums.get(key, 0) + value.float() * len(x)
    model.train()
    return {f"val_{k}": (v / len(images)).item() for k, v in sums.items()}


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay: bool) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based): a linear warm-up from 1/warmup_steps
    to 1 over the first warmup_steps, then constant, or with `decay` linear down to 0 at total_steps;
    past the last step (a benchmark may run on) it holds the last step's value."""
    step = min(step, total_steps - 1)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not decay:
        return 1.0
    return 1.0 - (step - warmup_steps) / max(1, total_steps - warmup_steps)


def library_code() -> dict[str, str]:
    """Source of every mnistgen module this process has imported: "the code" of a stage.

    dvc.yaml lists the same modules as each stage's code deps (tests/test_dvc_graph.py checks
    that), so a checkpoint is resumed only by the code that DVC would also call unchanged.
    """
    package = Path(__file__).resolve().parent
    files = {
        Path(str(m.__file__)).resolve()
        for name, m in list(sys.modules.items())
        if name.split(".")[0] == __package__ and getattr(m, "__file__", None)
    }
    return {str(f.relative_to(package)): f.read_text() for f in sorted(files)}


def check_finite(metrics: dict[str, float], family: str, epoch: int) -> None:
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        key, value = next(iter(bad.items()))
        raise DivergenceError(
            f"{family}: training diverged: {key} is {value} in epoch {epoch}; stopped, no model was saved or registered"
        )


def rng_state() -> dict:
    """This process's RNG states: torch's CPU generator, and every CUDA device's or the MPS device's when there is one."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


class Checkpoint:
    """models state, optimiser state, RNG states and history after each epoch, written atomically.

    Rank 0 writes the checkpoint; under torchrun every other rank writes its own RNG states beside it
    (last.rank1.pt, ...), since each rank draws its own noise and must resume with its own generator."""

    def __init__(self, path: str | Path, fingerprint: dict):
        self.path = Path(path)
        self.fingerprint = sha256_json(fingerprint)

    def rank_path(self, rank: int) -> Path:
        return self.path.with_name(f"{self.path.stem}.rank{rank}{self.path.suffix}")

    def save_rank_rng(self, epoch: int) -> None:
        """A rank other than 0: its RNG states after `epoch`."""
        state = {"fingerprint": self.fingerprint, "epoch": epoch, "rng": rng_state()}
        atomic_torch_save(state, self.rank_path(distributed.rank()))

    def rank_rng(self, epoch: int) -> dict | None:
        """This rank's own RNG states saved after `epoch`, or None (rank 0, or no matching file)."""
        if distributed.rank() == 0 or not self.rank_path(distributed.rank()).exists():
            return None
        saved = torch.load(self.rank_path(distributed.rank()), map_location="cpu", weights_only=True)
        return saved["rng"] if saved.get("fingerprint") == self.fingerprint and saved.get("epoch") == epoch else None

    def save(self, model, optimizers, schedulers, epoch, history, shuffle_rng, ema=None) -> None:
        state = {
            "fingerprint": self.fingerprint,
            "epoch": epoch,
            "history": history,
            "model": model.state_dict(),
            "ema": None if ema is None else ema.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "schedulers": [s.state_dict() for s in schedulers],
            "rng": {**rng_state(), "shuffle": shuffle_rng.get_state()},
        }
        atomic_torch_save(state, self.path)

    def load(self) -> dict | None:
        """The saved state, None if there is none or it belongs to other params; a corrupt file is an error."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            state["epoch"], state["model"], state["rng"]
        except Exception as err:
            raise StageError(
                f"{self.path}: corrupt checkpoint ({type(err).__name__}: {err}); delete it to train from scratch"
            ) from err
        if state.get("fingerprint") != self.fingerprint:
            if distributed.is_main():
                print(f"{self.path}: made with other params or data; training from scratch")
            return None
        return state


def restore(state, model, optimizers, schedulers, shuffle_rng, ema=None, own_rng: dict | None = None) -> None:
    """Everything back as it was after the checkpoint's epoch; `own_rng`: this rank's RNG states when not rank 0's."""
    model.load_state_dict(state["model"])
    for scheduler, saved in zip(schedulers, state["schedulers"]):
        scheduler.load_state_dict(saved)
    if ema is not None:
        ema.load_state_dict(state["ema"])
    for key, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][key])
    set_rng_state(own_rng or state["rng"])
    shuffle_rng.set_state(state["rng"]["shuffle"])  # the shuffle is the same on every rank


def step(
    model: GenerativeModel,
    x: torch.Tensor,
    optimizers: dict,
    global_step: int,
    dtype: torch.dtype = torch.float32,
    y: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One optimisation step of any family on batch x (and its labels y, for a conditional family), its matmuls
    and convolutions autocast to `dtype` (utils.training_dtype)."""
    given = () if y is None else (y,)
    with autocast(x.device, dtype), distributed.training_step():
        return model.train_step(x, optimizers, global_step, *given)


def ema_with_warmup(decay: float):
    """AveragedModel's multi_avg_fn: e <- d e + (1 - d) w with d = min(decay, (1 + n) / (10 + n)) after n updates.

    The warm-up (as TensorFlow's ExponentialMovingAverage with num_updates) keeps a short run's average from
    holding on to the random initial weights: at decay 0.999 those would still weigh 0.42 after 859 steps.
    All on the device (no host sync per step).
    """

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():  # num_batches_tracked: follow the model
            torch._foreach_copy_(averaged, current)
            return
        n = n_averaged.to(averaged[0].dtype)
        d = torch.clamp((1 + n) / (10 + n), max=decay)
        torch._foreach_mul_(averaged, d)
        torch._foreach_add_(averaged, torch._foreach_mul(current, 1 - d))

    return update


def effective_decay(decay: float, steps: int) -> float:
    """The decay ema_with_warmup applies at the last of `steps` updates: below `decay` when the run is too short
    for the warm-up to reach it (the default CWGAN's 6,872 steps reach 0.99869, not 0.999)."""
    return 0.0 if decay == 0 else min(decay, (1 + (steps - 1)) / (10 + (steps - 1)))


@contextlib.contextmanager
def sampling_weights(model: GenerativeModel, ema: AveragedModel | None):
    """The weights the stage will save, in place for a while: the moving average's when there is one (then the
    raw weights back), so that per-epoch curves, sample grids and a sweep's objective score the model that is kept."""
    if ema is None:
        yield
        return
    raw = {k: v.clone() for k, v in model.averaged().state_dict().items()}
    model.averaged().load_state_dict(ema.module.state_dict())
    try:
        yield
    finally:
        model.averaged().load_state_dict(raw)


def moving_average(model: GenerativeModel) -> AveragedModel | None:
    """A copy of model.averaged() that follows it as an exponential moving average, `ema_decay` per step (None at 0)."""
    decay = model.params.ema_decay
    if decay == 0:
        return None
    # use_buffers: batch-norm running statistics are averaged too, so the copy is a complete model.
    return AveragedModel(model.averaged(), multi_avg_fn=ema_with_warmup(decay), use_buffers=True)


def schedules(optimizers: dict, steps_per_epoch: int, epochs: int, warmup_epochs: float, decay: bool) -> list[LambdaLR]:
    """Linear warm-up and optional linear decay of every optimizer's learning rate, stepped once per
    global step (also for a GAN's generator, which steps only every n_critic-th: one clock for both)."""
    factor = functools.partial(
        lr_factor, total_steps=epochs * steps_per_epoch, warmup_steps=round(warmup_epochs * steps_per_epoch), decay=decay
    )
    return [LambdaLR(optimizer, factor) for optimizer in optimizers.values()]


class Stepper:
    """The step loop of `train`, which the benchmarks drive too: the whole training set one tensor on the
    device, a seeded permutation per epoch, full batches sliced from it (this rank's slice of each), one
    step of the family, every learning-rate schedule stepped, the moving average updated, and the losses
    summed on the device (read once, by `take_means`: no host sync inside the loop)."""

    def __init__(
        self,
        model: GenerativeModel,
        images: torch.Tensor,
        optimizers: dict,
        lr_schedules: list[LambdaLR],
        shuffle_rng: torch.Generator,
        labels: torch.Tensor | None = None,
        ema: AveragedModel | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.model, self.images, self.labels, self.optimizers = model, images, labels, optimizers
        self.lr_schedules, self.shuffle_rng, self.ema, self.dtype = lr_schedules, shuffle_rng, ema, dtype
        self.batch_size = model.params.batch_size
        self.per_epoch = batches(len(images), self.batch_size)
        self.global_step = 0
        self.order = torch.empty(0, dtype=torch.long)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's images (and labels, for a conditional family) of the next global batch."""
        i = self.global_step % self.per_epoch
        if i == 0:  # a new epoch: a fresh seeded permutation, moved to the device once
            self.order = torch.randperm(len(self.images), generator=self.shuffle_rng).to(self.images.device)
        idx = distributed.local_rows(self.order[i * self.batch_size : (i + 1) * self.batch_size])
        return self.images[idx], None if self.labels is None else self.labels[idx]

    def run(self, count: int, description: str | None = None) -> None:
        """`count` steps (with a progress bar on a terminal when `description` is given)."""
        for _ in progress_bar(range(count), description or "", description is not None):
            x, y = self.next_batch()
            losses = step(self.model, x, self.optimizers, self.global_step, self.dtype, y=y)
            for scheduler in self.lr_schedules:
                scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model.averaged())
            for key, value in losses.items():
                self.sums[key] = self.sums.get(key, 0) + value.float()
                self.counts[key] = self.counts.get(key, 0) + 1  # a GAN's g_loss only every n_critic-th step
            self.global_step += 1

    def take_means(self) -> dict[str, torch.Tensor]:
        """The mean of each loss since the last call (on the device), and a fresh start."""
        means = {k: v / self.counts[k] for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return means


def train(
    model: GenerativeModel,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    *,
    seed: int,
    checkpoint: Checkpoint | None = None,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
    train_labels: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    raw_weights: dict | None = None,
) -> list[dict]:
    """Train `model` as its params say (epochs, batch size, schedule) on device-resident images in [0, 1].

    A conditional family needs `train_labels` and `val_labels` (device tensors of digits, one per
    image); an unconditional one ignores them. Returns one dict of metrics per epoch. In a
    data-parallel run every rank passes the whole training set, and the params' batch size is the
    global batch, of which each rank trains on its slice (distributed.local_rows).

    With `ema_decay` > 0 the moving average is what every epoch's validation losses and `on_epoch` see, and
    what the model holds at the end; `raw_weights`, when given, receives the last raw weights of model.averaged().
    The params' `precision` (utils.training_dtype) is the steps' and the validation losses' autocast.
    """
    if not model.conditional:
        train_labels = val_labels = None
    elif train_labels is None or val_labels is None:
        raise StageError(f"{model.family} is conditional: training needs the labels of the training and validation images")
    params = model.params
    epochs = params.epochs
    main = distributed.is_main()
    model.init_from_data(train_images)  # before a resume, which then overwrites the weights
    # Conv weights in the device's faster layout; [N, 1, 28, 28] batches are the same in either.
    model.to(memory_format=memory_format(train_images.device))
    distributed.prepare_model(model)
    optimizers = model.make_optimizers()
    distributed.prepare_optimizers(optimizers)
    steps = batches(len(train_images), params.batch_size)
    lr_schedules = schedules(optimizers, steps, epochs, params.lr_warmup, params.lr_decay)
    shuffle_rng = torch.Generator().manual_seed(seed)
    ema = moving_average(model)
    history: list[dict] = []
    start_epoch = 0
    state = checkpoint.load() if checkpoint else None
    if checkpoint is not None and state is not None:
        own_rng = checkpoint.rank_rng(state["epoch"])
        if distributed.rank() > 0 and own_rng is None:
            raise StageError(
                f"{checkpoint.rank_path(distributed.rank())}: this rank's RNG states for epoch {state['epoch']} are missing"
            )
        restore(state, model, optimizers, lr_schedules, shuffle_rng, ema, own_rng)
        history, start_epoch = state["history"], state["epoch"]
        if main:
            print(f"{model.family}: resumed from {checkpoint.path} after epoch {start_epoch}")
    dtype = training_dtype(train_images.device, params.precision)
    stepper = Stepper(model, train_images, optimizers, lr_schedules, shuffle_rng, train_labels, ema, dtype)
    stepper.global_step = start_epoch * steps
    model.train()
    for epoch in range(start_epoch + 1, epochs + 1):
        started = time.perf_counter()
        stepper.run(steps, f"{model.family} {epoch}/{epochs}" if progress and main else None)
        losses = stepper.take_means()
        means = distributed.mean_over_ranks(torch.stack(list(losses.values())))  # each rank's batches are as many
        metrics = dict(zip(losses, means.tolist()))  # the one host sync of the epoch
        check_finite(metrics, model.family, epoch)
        seconds = time.perf_counter() - started
        with sampling_weights(model, ema):
            metrics.update(validation_losses(model, val_images, 1000, val_labels, dtype))
        check_finite(metrics, model.family, epoch)
        history.append(
            {"epoch": epoch, **metrics, "epoch_seconds": seconds, "images_per_second": steps * params.batch_size / seconds}
        )
        if main:  # the other ranks go on and wait in the next epoch's first all-reduce
            print(
                f"{model.family} epoch {epoch}/{epochs}: "
                + ", ".join(f"{k} {v:.4g}" for k, v in history[-1].items() if k != "epoch")
            )
            if checkpoint:
                checkpoint.save(model, optimizers, lr_schedules, epoch, history, shuffle_rng, ema)
            if on_epoch:
                with sampling_weights(model, ema):
                    on_epoch(epoch, history[-1], model)
        elif checkpoint:
            checkpoint.save_rank_rng(epoch)
    if ema is not None:  # the averaged weights are the ones that sample, are evaluated and registered
        if raw_weights is not None:
            raw_weights.update({k: v.clone() for k, v in model.averaged().state_dict().items()})
        model.averaged().load_state_dict(ema.module.state_dict())
    model.eval()
    model.fit_prior(train_images)
    return history


def compile_in_place(model: GenerativeModel) -> list[str]:
    """torch.compile each direct submodule in place (nn.Module.compile), except those the model differentiates
    twice (a Wasserstein critic, WGAN's and CWGAN's alike: its gradient penalty uses create_graph=True), which
    compiled graphs do not support, so they stay eager. Returns the compiled names.
    """
    names = []
    for name, child in model.named_children():
        if name in model.twice_differentiated:
            continue
        child.compile()
        names.append(name)
    return names
