"""Train the evaluator classifier and compute the reference features every metric compares against."""

from __future__ import annotations

import math
import time

import torch
from torch.nn import functional as F

from .classifier import Classifier
from .config import EvaluatorParams
from .utils import StageError, progress_bar


def random_shift(x: torch.Tensor, generator: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Shift each image by up to `pixels` in x and y (one pad + one gather per batch, no per-sample loop)."""
    n = x.shape[0]
    padded = F.pad(x, (pixels,) * 4)[:, 0]  # [n, 28 + 2p, 28 + 2p]
    dx, dy = torch.randint(0, 2 * pixels + 1, (2, n), generator=generator).to(x.device)
    grid = torch.arange(28, device=x.device)
    rows, cols = grid[None, :] + dy[:, None], grid[None, :] + dx[:, None]  # [n, 28] each
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


@torch.no_grad()
def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    _, probs = model.features_and_probs(images)
    return (probs.argmax(1) == labels).float().mean().item()


def train_classifier(train_x, train_y, params: EvaluatorParams, progress: bool = True) -> Classifier:
    """Adam with a one-cycle schedule and small random shifts: about 99.4 % test accuracy in 4 epochs (~60 s on 2 CPU cores)."""
    torch.manual_seed(params.seed)
    generator = torch.Generator().manual_seed(params.seed)
    model = Classifier(params.width, params.arch).to(train_x.device)
    steps = len(train_x) // params.batch_size
    if steps == 0:
        raise StageError(f"params.yaml: evaluator.batch_size {params.batch_size} exceeds the training set ({len(train_x)})")
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, params.lr, total_steps=steps * params.epochs)
    model.train()
    for epoch in range(1, params.epochs + 1):
        started = time.perf_counter()
        order = torch.randperm(len(train_x), generator=generator).to(train_x.device)
        total = torch.zeros((), device=train_x.device)
        for step in progress_bar(range(steps), f"evaluator {epoch}/{params.epochs}", progress):
            idx = order[step * params.batch_size : (step + 1) * params.batch_size]
            loss = F.cross_entropy(model(random_shift(train_x[idx], generator, params.shift_pixels)), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.detach()
        mean_loss = (total / steps).item()
        if not math.isfinite(mean_loss):
            raise StageError(f"evaluator: training loss became {mean_loss} in epoch {epoch}")
        print(f"evaluator epoch {epoch}/{params.epochs}: loss {mean_loss:.4f}, {time.perf_counter() - started:.1f} s")
    model.eval()
    return model
