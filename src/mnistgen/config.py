"""Typed configuration: one pydantic model per section of params.yaml.

Every section is strict (no string-to-number coercion), frozen, and refuses unknown keys.
params.yaml is the one place where values live: no field has a default here, so a key
missing from params.yaml is an error rather than a silently different value.

The model families' sections (`models.<name>`) are a discriminated union on `family`:
each family declares its own params class beside its model (models/<family>.py), and
mnistgen.models.model_params validates a section against that union, so `n_critic` under an
AE or `beta` under a GAN is refused with the key named, and adding a family needs no change
here. This module imports nothing of the package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

PARAMS_FILE = Path("params.yaml")


class ParamsError(ValueError):
    """A params.yaml key is missing, unknown or of the wrong type."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class PrepareParams(Section):
    val_size: PositiveInt  # carved from the training images with split_seed
    split_seed: int
    limit_train: NonNegativeInt  # 0 = all 60,000 training images (validation is carved from them)
    limit_test: NonNegativeInt  # 0 = all 10,000 test images


class ValidateParams(Section):
    class_fraction_min: float
    class_fraction_max: float
    image_mean_min: float  # per-image mean intensity band, 0..255 scale
    image_mean_max: float
    split_mean_min: float  # mean intensity of a whole split
    split_mean_max: float
    max_train_test_duplicates: NonNegativeInt


class EvaluatorParams(Section):
    """Sections `evaluator` (the first feature space) and `evaluator2` (the second opinion)."""

    arch: Literal["strided", "maxpool"]  # strided convs, or convs at full resolution + max-pooling
    width: PositiveInt  # channels of the first conv layer
    epochs: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    shift_pixels: NonNegativeInt  # random-shift augmentation
    seed: int
    min_val_accuracy: float  # checked when trained, and again when a pinned version is used on this data


GRADES = ("smoke", "sweep", "experiment", "default", "paper")  # lowest first: the gate never moves @champion down this list


class RunParams(Section):
    """Settings shared by every training run (section `train`)."""

    grade: Literal[
        "smoke", "default", "paper"
    ]  # set by the params profile (params-smoke.yaml, params-paper.yaml); sweep trials are "sweep"
    seed: int
    device: str  # auto | cpu | cuda | cuda:N
    deterministic: bool
    experiment: str
    sample_every: PositiveInt  # log a fixed-noise sample grid every N epochs
    dist_timeout_s: PositiveInt  # under torchrun: a collective waiting longer than this fails the run (a hung rank)


class ModelParams(Section):
    """What every family's section `models.<name>` has; each family adds its own fields."""

    family: str
    arch: Literal["conv", "mlp"]
    latent_dim: PositiveInt
    width: PositiveInt  # channels of the first conv layer (arch: conv)
    hidden: PositiveInt  # hidden units (arch: mlp)
    epochs: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    lr_warmup: NonNegativeFloat  # epochs of linear learning-rate warm-up at the start
    lr_decay: bool  # linear learning-rate decay to 0 at the last step (after the warm-up)
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)]  # moving average of the sampling weights per step; 0 = off
    precision: Literal["auto", "fp32", "bf16"]  # training's autocast (utils.training_dtype); measurement is fp32


class EvaluateParams(Section):
    evaluators: str  # the pinned evaluator version's folder (evaluators/v1): the ruler, part of the protocol
    seed: int
    num_samples: PositiveInt
    per_class_samples: PositiveInt  # conditional models: samples asked for each digit (label fidelity, per-class FID_cls)
    num_real: PositiveInt
    batch_size: PositiveInt
    kid_subsets: PositiveInt
    kid_subset_size: PositiveInt
    is_splits: PositiveInt
    pr_k: PositiveInt
    interp_pairs: PositiveInt
    interp_steps: Annotated[int, Field(ge=3)]
    iwae_k: PositiveInt
    iwae_images: NonNegativeInt  # test images of the -ELBO and the IWAE bound: a seeded random subset (0 = all)
    binarize_seed: int  # the Bernoulli draw that binarises the test images once
    bootstrap: Annotated[int, Field(ge=10)]  # bootstrap rounds of the noise bands (FID, KID, precision, recall)
    bootstrap_level: Annotated[float, Field(gt=0, lt=1)]  # coverage of a band, e.g. 0.95
    bootstrap_seed: int


class ReferenceParams(Section):
    """The keys of `evaluate` that choose the reference images and the ruler: all the reference stage reads of
    that section, so changing another key (iwae_k, ...) does not recompute the references."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)
    seed: int
    num_real: PositiveInt


class Floor(Section):
    metric: str
    min: float | None = None  # an absent limit is no limit, not a default value
    max: float | None = None


class GateParams(Section):
    """One model's rule, section `gate.<model>`."""

    primary: str  # fid_cls or iwae_nll: the metrics a paired comparison is defined for
    higher_is_better: bool
    agree_in_both_spaces: bool  # also require the gain in the second evaluator's space (<primary>_e2)
    floors: tuple[Floor, ...] = Field(strict=False)  # YAML gives a list


class GateSettings(Section):
    """What every model's rule shares: `gate.alpha` and the paired bootstrap behind each comparison."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)  # the section's other keys are the models' rules
    alpha: Annotated[
        float, Field(gt=0, lt=0.5)
    ]  # the false-promotion rate the rule allows: a reseeded recipe wins at most this often
    bootstrap: Annotated[
        int, Field(ge=100)
    ]  # paired bootstrap rounds behind each comparison's evaluation noise (2,000 in params.yaml)
    bootstrap_seed: int


class FloatRange(Section):
    """A float drawn from [low, high] (log: on a log scale)."""

    type: Literal["float"]
    low: float
    high: float
    log: bool

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if not self.low < self.high or (self.log and self.low <= 0):
            raise ValueError(f"needs low < high (and low > 0 with log), got {self.low}..{self.high}")
        return self


class IntRange(FloatRange):
    """An integer drawn from low..high inclusive."""

    type: Literal["int"]  # type: ignore[assignment]  # a subclass narrows the union tag
    low: int
    high: int


class Choice(Section):
    type: Literal["choice"]
    choices: tuple[int | float | str | bool, ...] = Field(strict=False, min_length=1)  # YAML gives a list


Dimension = Annotated[FloatRange | IntRange | Choice, Field(discriminator="type")]


class SweepParams(Section):
    """Section `sweep`: the Optuna search (`mnistgen sweep`), objective on the validation split."""

    experiment: str  # MLflow experiment of the sweep runs (one parent run per study, one nested run per trial)
    sampler_seed: int  # TPE sampler; each worker adds its --worker number, so workers do not draw the same start points
    pruner_startup_trials: NonNegativeInt  # MedianPruner: trials that finish before any is pruned
    pruner_warmup_epochs: NonNegativeInt  # epochs every trial trains: the earliest pruning is after epoch warmup + 1
    fid_samples: PositiveInt  # GAN families: samples scored each epoch against the validation images (FID_cls)
    space: dict[str, dict[str, Dimension]]  # model name -> its params key -> the range searched


def describe(err: ValidationError, where: str, tag: str | None = None, families: tuple[str, ...] = ()) -> ParamsError:
    """pydantic's first error as one line that names the key, e.g. 'models.ae.n_critic: unknown key'.

    `tag` and `families` are a tagged union's: the tag given and the known ones."""
    # An unknown key first: a misspelt key is also reported missing under its right name.
    first = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    loc = list(first["loc"])
    if tag is not None and loc and loc[0] == tag:  # a tagged union puts the tag first
        loc = loc[1:]
    key = ".".join([where, *map(str, loc)])
    kind = first["type"]
    if kind == "extra_forbidden":
        return ParamsError(f"params.yaml: {key}: unknown key")
    if kind == "missing":
        return ParamsError(f"params.yaml: {key}: missing key")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return ParamsError(f"params.yaml: {key}.family: unknown or missing model family {tag!r} (known: {', '.join(families)})")
    return ParamsError(f"params.yaml: {key}: {first['msg'].lower()}, got {first.get('input')!r:.80}")


S = TypeVar("S", bound="Section")


def validate_section(cls: type[S], data: Any, where: str) -> S:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise describe(err, where) from None


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
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


def section(params: dict[str, Any], dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamsError(f"params.yaml: {dotted}: missing key")
        node = node[part]
    return node


def load_section(cls: type[S], dotted: str, path: str | Path = PARAMS_FILE) -> S:
    """Read params.yaml and return section `dotted` (e.g. 'evaluate') as a `cls`."""
    return validate_section(cls, section(read_params(path), dotted), dotted)


def model_names(path: str | Path = PARAMS_FILE) -> list[str]:
    """The one list of models: the keys of params.yaml's `models` section (dvc.yaml's foreach reads the same)."""
    models = section(read_params(path), "models")
    if not isinstance(models, dict) or not models:
        raise ParamsError("params.yaml: models: must be a mapping of model name -> section")
    return list(models)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; for logging params to MLflow."""
    if isinstance(data, BaseModel):
        data = data.model_dump()
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}
