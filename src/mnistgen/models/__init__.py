"""Model families by name: one file per family, each registering itself when imported.

Every module of this package is imported here, so a new family is one new file (its model
class and its params class) plus its section in params.yaml; nothing else lists families.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Annotated, Union

from pydantic import Field

from ..config import ModelParams
from .base import FAMILIES, GenerativeModel

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def params_union():
    """The discriminated union of every registered family's params class, tagged by `family`."""
    classes = tuple(cls.Params for cls in FAMILIES.values())
    return Annotated[Union[classes], Field(discriminator="family")]  # noqa: UP007 - built at run time


def build_model(params: ModelParams) -> GenerativeModel:
    return FAMILIES[params.family](params)


__all__ = ["FAMILIES", "GenerativeModel", "build_model", "params_union"]
