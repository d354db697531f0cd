"""MNIST splits: carve, save, load, and guard the test split (mnist_files fetches and parses the four files).

Prepared splits are saved as plain tensors (uint8 images, int64 labels) and loaded back as one float tensor on
the device. This module imports no torchvision: every stage imports it, and torchvision costs a stage about 1.7 s
of start-up (it pulls in torch._dynamo).

The test split reports and never chooses: loading it raises unless the caller says, with
`reading_test(role)`, that it is one of the readers that report (TEST_READERS). Training, sweeps,
promotion and benchmarks that pick a setting read the validation split only.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from .config import PrepareParams
from .utils import StageError

SPLITS = ("train", "val", "test")
# Who may read the test split: the stages that check the data (validate) or measure it for the report (reference,
# evaluate, report), the seeds' spread beside each reported figure, and a benchmark's report after its choice is made.
TEST_READERS = ("validate", "reference", "evaluate", "report", "seeds", "benchmark report")
_test_reader: list[str] = []  # the roles that are reading it now
T = TypeVar("T")


class SplitRefused(StageError):
    """Code that chooses asked for the test split."""


@contextlib.contextmanager
def reading_test(role: str) -> Iterator[None]:
    """Within this block, `role` (one of TEST_READERS) may load the test split and its references."""
    if role not in TEST_READERS:
        raise ValueError(f"{role!r} does not read the test split; readers: {', '.join(TEST_READERS)}")
    _test_reader.append(role)
    try:
        yield
    finally:
        _test_reader.pop()


def reads_test(role: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """A function that runs inside `reading_test(role)`: a stage's main that reports."""

    def wrap(function: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(function)
        def inside(*args: Any, **kwargs: Any) -> T:
            with reading_test(role):
                return function(*args, **kwargs)

        return inside

    return wrap


def check_split_access(name: str, what: str) -> None:
    """Raise SplitRefused when `what` of the test split is asked for outside `reading_test`."""
    if name == "test" and not _test_reader:
        raise SplitRefused(
            f"{what}: the test split is read only to report ({', '.join(TEST_READERS)}); choices read the validation split"
        )


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 28, 28]
    labels: torch.Tensor  # int64 [N]


def make_splits(train: Split, test: Split, params: PrepareParams) -> dict[str, Split]:
    """Carve a seeded validation split from train; apply the `limit_*` subsets."""
    n_train = len(train.labels) if params.limit_train == 0 else params.limit_train
    n_test = len(test.labels) if params.limit_test == 0 else params.limit_test
    if not 0 < n_train <= len(train.labels):
        raise StageError(f"params.yaml: prepare.limit_train must be 0..{len(train.labels)}, got {params.limit_train}")
    if not 0 < n_test <= len(test.labels):
        raise StageError(f"params.yaml: prepare.limit_test must be 0..{len(test.labels)}, got {params.limit_test}")
    if not 0 < params.val_size < n_train:
        raise StageError(f"params.yaml: prepare.val_size must be between 1 and {n_train - 1}, got {params.val_size}")
    generator = torch.Generator().manual_seed(params.split_seed)
    order = torch.randperm(len(train.labels), generator=generator)[:n_train]
    val_idx, train_idx = order[: params.val_size], order[params.val_size :]
    test_idx = torch.arange(len(test.labels))
    if n_test < len(test.labels):
        test_idx = torch.randperm(len(test.labels), generator=generator)[:n_test].sort().values
    pick = lambda s, i: Split(s.images[i].contiguous(), s.labels[i].contiguous())
    return {
        "train": pick(train, train_idx.sort().values),
        "val": pick(train, val_idx.sort().values),
        "test": pick(test, test_idx),
    }


def save_split(split: Split, path: Path) -> None:
    torch.save({"images": split.images, "labels": split.labels}, path)


def load_split(prepared: str | Path, name: str) -> Split:
    path = Path(prepared) / f"{name}.pt"
    check_split_access(name, str(path))
    try:
        data = torch.load(path, weights_only=True)
        return Split(data["images"], data["labels"])
    except FileNotFoundError as err:
        raise StageError(f"{path}: not found; run `dvc repro prepare` first") from err
    except Exception as err:
        raise StageError(f"{path}: cannot load prepared split ({err})") from err


def split_hashes(prepared: str | Path) -> dict[str, str]:
    """{split: sha256 of its images and labels} as the prepare stage recorded them."""
    return json.loads((Path(prepared) / "meta.json").read_text())["sha256"]


def to_float(images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28] in [0, 1], on `device` (the whole set, once)."""
    return images.to(device).unsqueeze(1).float().div_(255.0)
