"""The evaluators: small MNIST classifiers whose penultimate layer is a feature space for FID_cls,
KID_cls and precision/recall, and whose softmax gives IS_cls and class coverage.

Two architectures give two feature spaces (a metric that flips between them is not a finding):
`strided` (the first evaluator: strided convs) and `maxpool` (the second: convs at full
resolution, each followed by 2x2 max-pooling, a different seed).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .config import EvaluatorParams
from .utils import StageError, progress_bar, sha256_file

FEATURE_DIM = 128


@dataclass(frozen=True)
class FeatureSpace:
    suffix: str  # of its metrics' names: fid_cls<suffix>
    section: str  # of params.yaml: the evaluator's architecture, seed and training
    name: str  # in the report
    files: str  # suffix of its files in the evaluator folder: classifier<files>.pt, reference<files>.pt


FEATURE_SPACES = (FeatureSpace("", "evaluator", "evaluator 1", ""), FeatureSpace("_e2", "evaluator2", "evaluator 2", "2"))
SPACES = {space.suffix: space.name for space in FEATURE_SPACES}  # metric-name suffix -> the feature space it is measured in
SPACES_FILE = "spaces.json"  # in the evaluator folder: one entry per space (suffix, files, arch, width, hash)
MANIFEST = "manifest.json"  # in a pinned evaluator version (evaluators/v1/): its weights' hashes and how they were trained


class Classifier(nn.Module):
    def __init__(self, width: int = 32, arch: str = "strided"):
        super().__init__()
        self.arch, self.width = arch, width

        def block(cin, cout, kernel):
            if arch == "strided":  # strided convs: as accurate as max-pooling here, 3x faster on a CPU
                return nn.Sequential(nn.Conv2d(cin, cout, kernel, 2, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
            if arch == "maxpool":
                return nn.Sequential(
                    nn.Conv2d(cin, cout, kernel, 1, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
                )
            raise ValueError(f"unknown evaluator arch {arch!r} (strided | maxpool)")

        self.body = nn.Sequential(
            block(1, width, 5),  # 28 -> 14
            block(width, 2 * width, 3),  # 14 -> 7
            nn.Flatten(),
            nn.Linear(2 * width * 49, FEATURE_DIM, bias=False),
            nn.BatchNorm1d(FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    @torch.no_grad()
    def features_and_probs(self, images: torch.Tensor, batch_size: int = 1000):
        """Penultimate features [N, 128] and class probabilities [N, 10] of images in [0, 1], in batches."""
        feats, probs = [], []
        for i in range(0, len(images), batch_size):
            f = self.body(images[i : i + batch_size]).float()
            feats.append(f)
            probs.append(torch.softmax(self.head(f), dim=1))
        return torch.cat(feats), torch.cat(probs)


def load_classifier(path, arch: str, width: int, device="cpu") -> Classifier:
    """A trained evaluator from its state_dict file."""
    model = Classifier(width, arch)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device).eval()


def read_spaces(folder: Path) -> list[dict]:
    return json.loads((Path(folder) / SPACES_FILE).read_text())


def load_classifiers(folder: Path, device="cpu") -> dict[str, Classifier]:
    """{suffix: Classifier} for every feature space the reference stage wrote."""
    return {
        s["suffix"]: load_classifier(Path(folder) / s["classifier"], s["arch"], s["width"], device) for s in read_spaces(folder)
    }


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


def read_pinned(folder: Path) -> dict:
    """A pinned evaluator version's manifest, every weight file checked against the hash it pins.

    The evaluators are the ruler of every FID_cls, KID_cls and precision: a fresh clone on any CPU
    must measure with the same weights, so a file that does not match its pinned hash is an error,
    never a reason to retrain (retraining is `mnistgen evaluator train`, a new version)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StageError(f"{folder / MANIFEST}: cannot read the pinned evaluators' manifest ({err})") from err
    for space in manifest["spaces"]:
        path = folder / space["classifier"]
        found = sha256_file(path) if path.exists() else "missing"
        if found != space["evaluator_hash"]:
            raise StageError(
                f"{path}: sha256 {found[:16]} does not match the pinned {space['evaluator_hash'][:16]} in {folder / MANIFEST}; "
                "a ruler is never changed in place: train a new version with `mnistgen evaluator train`"
            )
    return manifest


def train_pinned(train_x, train_y, val_x, val_y, recipes: dict[str, EvaluatorParams], out: Path, version: str, data: str) -> dict:
    """Train every feature space's evaluator from its recipe and write a new pinned version to `out`
    (weights and manifest). The explicit, versioned way to change the ruler."""
    out.mkdir(parents=True, exist_ok=False)
    spaces = []
    for space in FEATURE_SPACES:
        recipe = recipes[space.section]
        model = train_classifier(train_x, train_y, recipe)
        val_accuracy = accuracy(model, val_x, val_y)
        if val_accuracy < recipe.min_val_accuracy:
            raise StageError(
                f"{space.section}: validation accuracy {val_accuracy:.4f} is below min_val_accuracy {recipe.min_val_accuracy}"
            )
        weights = f"classifier{space.files}.pt"
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out / weights)
        spaces.append(
            {
                "suffix": space.suffix,
                "section": space.section,
                "classifier": weights,
                "arch": recipe.arch,
                "width": recipe.width,
                "evaluator_hash": sha256_file(out / weights),
                "recipe": recipe.model_dump(),
                "val_accuracy": val_accuracy,
            }
        )
    manifest = {"version": version, "trained_on": data, "spaces": spaces}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
