"""Figures a user would rather look at than read: image grids, curves, latent scatter, histograms."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch.nn import functional as F


def grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Images [N, 1, H, W] -> one grey image [rows * (H + padding) + padding, nrow * (W + padding) + padding], nrow per row,
    the layout of torchvision's make_grid. Written here because importing torchvision costs every stage 1.7 s."""
    x = images.detach().float().cpu().clamp(0, 1)[:, 0]
    per_row = min(nrow, len(x))
    rows = -(-len(x) // per_row)
    x = torch.cat([x, x.new_full((rows * per_row - len(x), *x.shape[1:]), pad_value)])  # fill the last row
    x = F.pad(x, (padding, 0, padding, 0), value=pad_value)  # a border above and left of every image
    h, w = x.shape[1:]
    tiled = x.view(rows, per_row, h, w).permute(0, 2, 1, 3).reshape(rows * h, per_row * w)
    return F.pad(tiled, (0, padding, 0, padding), value=pad_value)  # and the closing border


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Images [N, 1, 28, 28] in [0, 1] -> one grey PNG grid, nrow images per row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = grid(images, nrow).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)  # save_image's rounding
    Image.fromarray(pixels.numpy(), mode="L").save(path)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], path: str | Path, title: str) -> Path:
    """One panel per training metric, its validation twin drawn beside it."""
    plt = _pyplot()
    keys = [k for k in history[0] if k not in {"epoch", "epoch_seconds", "images_per_second"} and not k.startswith("val_")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    epochs = [h["epoch"] for h in history]
    for ax, key in zip(axes[0], keys):
        ax.plot(epochs, [h[key] for h in history], marker="o", label="train")
        if f"val_{key}" in history[0]:
            ax.plot(epochs, [h[f"val_{key}"] for h in history], marker="s", label="val")
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def latent_scatter(
    codes: torch.Tensor, labels: torch.Tensor, path: str | Path, title: str, means: torch.Tensor | None = None
) -> Path:
    """2-D scatter of latent codes coloured by digit (PCA to 2-D when the latent is larger); `means` [10, latent]
    (the CVAE's learned class means) are marked with their digit, in the same projection."""
    plt = _pyplot()
    codes = codes.float().cpu()
    means = None if means is None else means.float().cpu()
    if codes.shape[1] > 2:
        centre = codes.mean(0)
        _, _, v = torch.pca_lowrank(codes - centre, q=2, center=False)
        codes = (codes - centre) @ v[:, :2]
        means = None if means is None else (means - centre) @ v[:, :2]
        title += " (PCA)"
    fig, ax = plt.subplots(figsize=(5, 4.5))
    points = ax.scatter(codes[:, 0], codes[:, 1], c=labels.cpu(), cmap="tab10", s=2, alpha=0.6)
    if means is not None:
        ax.scatter(
            means[:, 0],
            means[:, 1],
            c=range(len(means)),
            cmap="tab10",
            vmin=0,
            vmax=9,
            s=120,
            marker="X",
            edgecolors="black",
            linewidths=1.0,
            label="learned class means",
        )
        for digit, (x, y) in enumerate(means.tolist()):
            ax.annotate(str(digit), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=9, weight="bold")
        ax.legend(fontsize=7, loc="best")
    fig.colorbar(points, ax=ax, ticks=range(10), label="digit")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def class_histogram(histogram: list[int], path: str | Path, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3))
    total = max(sum(histogram), 1)
    ax.bar(range(10), [h / total for h in histogram], color="tab:blue")
    ax.axhline(0.1, color="k", linestyle="--", linewidth=1, label="uniform")
    ax.set_xticks(range(10))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("fraction of samples")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def side_by_side(images: dict[str, Path | None], path: str | Path, title: str) -> Path:
    """PNG images side by side, each under its caption (a missing one says so): a candidate's grid beside a champion's."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(images), figsize=(4.2 * len(images), 4.6), squeeze=False)
    for ax, (caption, image) in zip(axes[0], images.items()):
        if image is not None and Path(image).exists():
            ax.imshow(plt.imread(str(image)), cmap="gray")
        else:
            ax.text(0.5, 0.5, "no sample grid", ha="center", va="center")
        ax.set_title(caption, fontsize=10)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
