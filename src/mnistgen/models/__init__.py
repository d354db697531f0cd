"""Model families by name: one file per family, each registering itself when imported.

Every module of this package is imported here, so a new family is one new file (its model
class and its params class) plus its section in params.yaml; nothing else lists families (the
report's claims name the families of the story, and leave out a claim whose families are absent).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path
from typing import Annotated, Any, Union

import torch
from pydantic import Field, TypeAdapter, ValidationError

from ..config import PARAMS_FILE, ModelParams, describe, read_params, section
from ..utils import StageError
from .base import FAMILIES, GenerativeModel

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def params_union():
    """The discriminated union of every registered family's params class, tagged by `family`."""
    classes = tuple(cls.Params for cls in FAMILIES.values())
    return Annotated[Union[classes], Field(discriminator="family")]  # noqa: UP007 - built at run time


def model_params(data: Any, where: str = "models") -> ModelParams:
    """A `models.<name>` section as its family's params class (the union over registered families)."""
    tag = data.get("family") if isinstance(data, dict) else None
    try:
        return TypeAdapter(params_union()).validate_python(data)
    except ValidationError as err:
        raise describe(err, where, tag, tuple(FAMILIES)) from None


def load_model_params(name: str, path: str | Path = PARAMS_FILE) -> ModelParams:
    return model_params(section(read_params(path), f"models.{name}"), f"models.{name}")


def build_model(params: ModelParams) -> GenerativeModel:
    return FAMILIES[params.family](params)


def load_trained(folder: Path, device: torch.device | str = "cpu") -> GenerativeModel:
    """A trained model from its folder (config.json and weights.pt, as the train stage and a logged model hold them)."""
    folder = Path(folder)
    try:
        params = model_params(json.loads((folder / "config.json").read_text()), f"{folder}/config.json")
        model = build_model(params)
        model.load_state_dict(torch.load(folder / "weights.pt", map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, json.JSONDecodeError) as err:
        raise StageError(f"{folder}: cannot load the trained model ({err})") from err
    return model.to(device).eval()


__all__ = ["FAMILIES", "GenerativeModel", "build_model", "load_model_params", "load_trained", "model_params", "params_union"]
