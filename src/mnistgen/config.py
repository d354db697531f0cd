"""Typed configuration: one dataclass per section of params.yaml.

Each pipeline stage reads only its own section(s). `load_section` checks every key
against the dataclass's annotations, so a wrong type or an unknown key fails with one
message that names the key (e.g. "params.yaml: models.vae.lr must be float, got 'fast'").
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ParamsError(ValueError):
    """A params.yaml key is missing, unknown or of the wrong type."""


@dataclasses.dataclass(frozen=True)
class PrepareParams:
    val_size: int = 5000
    split_seed: int = 0
    limit_train: int = 0  # 0 = all 60,000 training images (validation is carved from them)
    limit_test: int = 0  # 0 = all 10,000 test images


@dataclasses.dataclass(frozen=True)
class ValidateParams:
    class_fraction_min: float = 0.08
    class_fraction_max: float = 0.12
    image_mean_min: float = 5.0  # per-image mean intensity band, 0..255 scale
    image_mean_max: float = 120.0
    split_mean_min: float = 25.0  # mean intensity of a whole split
    split_mean_max: float = 40.0
    max_train_test_duplicates: int = 10


@dataclasses.dataclass(frozen=True)
class RunParams:
    """Settings shared by every training run (section `train`)."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = False
    experiment: str = "mnist-generative"
    sample_every: int = 2  # log a fixed-noise sample grid every N epochs


@dataclasses.dataclass(frozen=True)
class EvaluatorParams:
    epochs: int = 4
    batch_size: int = 128
    lr: float = 0.005
    shift_pixels: int = 1  # random-shift augmentation
    seed: int = 0
    min_test_accuracy: float = 0.993


@dataclasses.dataclass(frozen=True)
class ModelParams:
    """One model's section `models.<name>`; fields not used by a family are ignored by it."""

    family: Literal["ae", "vae", "gan", "wgan"]
    epochs: int
    batch_size: int
    lr: float
    arch: Literal["conv", "mlp"] = "conv"
    latent_dim: int = 16
    width: int = 32  # channels of the first conv layer (or hidden units / 10 for mlp)
    hidden: int = 400  # mlp hidden units
    # VAE
    beta: float = 1.0
    dynamic_binarization: bool = False
    # GANs
    betas: tuple[float, float] = (0.5, 0.999)
    n_critic: int = 1
    gp_weight: float = 10.0
    penalty: Literal["two_sided", "one_sided"] = "two_sided"
    gradient: Literal["autograd", "finite_difference"] = "autograd"
    lr_warmup: float = 0.0  # epochs of linear learning-rate warm-up at the start
    lr_decay: bool = False  # linear learning-rate decay to 0 at the last step (per step, after the warm-up)


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    seed: int = 0
    num_samples: int = 10000
    num_real: int = 10000
    batch_size: int = 1000
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    is_splits: int = 10
    pr_k: int = 3
    interp_pairs: int = 500
    interp_steps: int = 9
    iwae_k: int = 1000
    iwae_images: int = 10000  # test images used for the IWAE bound (0 = all)
    binarize_seed: int = 0


@dataclasses.dataclass(frozen=True)
class Floor:
    metric: str
    min: float | None = None
    max: float | None = None


@dataclasses.dataclass(frozen=True)
class GateParams:
    primary: str
    higher_is_better: bool
    min_improvement: float  # the candidate must beat the champion by at least this much...
    tolerance: float  # ...plus this noise tolerance
    floors: tuple[Floor, ...] = ()


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check `value` against annotation `kind`; return it converted (ints to floats, lists to tuples)."""
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(kind):
            raise ParamsError(f"params.yaml: {key} must be one of {list(typing.get_args(kind))}, got {value!r}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(kind)
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if origin is tuple:
        args = typing.get_args(kind)
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"params.yaml: {key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ParamsError(f"params.yaml: {key} must have {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, key)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"params.yaml: {key} must be float, got {value!r}")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"params.yaml: {key} must be int, got {value!r}")
        return value
    if not isinstance(value, kind):
        raise ParamsError(f"params.yaml: {key} must be {kind.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: Any, key: str):
    """Build dataclass `cls` from a mapping, naming `key.field` in every error."""
    if not isinstance(data, dict):
        raise ParamsError(f"params.yaml: {key} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(f"params.yaml: unknown key {key}.{unknown[0]} (known: {', '.join(fields)})")
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = _coerce(data[name], hints[name], f"{key}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ParamsError(f"params.yaml: missing key {key}.{name}")
    return cls(**values)


def read_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise ParamsError(f"{path}: file not found") from err
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping")
    return data


def merge_overrides(base: dict, overrides: dict, where: str = "") -> dict:
    """Deep-merge an overrides file's mapping (params-smoke.yaml, params-paper.yaml) into `base`, in place.

    Only the keys in `overrides` change; a key that `base` does not have is an error, so an
    override cannot silently miss.
    """
    for key, value in overrides.items():
        if key not in base:
            raise ParamsError(f"params overrides: {where}{key} is not a key of params.yaml")
        if isinstance(value, dict) and isinstance(base[key], dict):
            merge_overrides(base[key], value, f"{where}{key}.")
        else:
            base[key] = value
    return base


def read_merged_params(path: str | Path, base: str | Path = "params.yaml") -> dict:
    """`path` as a full params file, or as an overrides file merged onto `base`."""
    if Path(path).resolve() == Path(base).resolve():
        return read_params(path)
    return merge_overrides(read_params(base), read_params(path))


def section(params: dict, dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamsError(f"params.yaml: missing key {dotted}")
        node = node[part]
    return node


def load_section(cls: type, dotted: str, path: str | Path = "params.yaml"):
    """Read params.yaml and return section `dotted` (e.g. 'models.vae') as a `cls`."""
    return from_dict(cls, section(read_params(path), dotted), dotted)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; for logging params to MLflow."""
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}
