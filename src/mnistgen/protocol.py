"""What a measurement depends on besides the model's weights, and its short name (the fingerprint).

Two evaluations with equal fingerprints are comparable number for number. The protocol holds the split and its
data, the ruler (each evaluator's weights), every count, seed and bootstrap setting of `evaluate` (batch_size only
chunks the work: every draw is made at once on a CPU generator), the device type and torch version the numbers were
computed with, and the code on the measurement path: the evaluation, the metrics, the evaluators, the data's
loading and transforms, and the model family's sampling and likelihood methods. Code is hashed from its parsed
source without docstrings and imports, so an edit to a comment or a docstring, or a module moved to another
package (which rewrites only imports), does not change the protocol; nor does a change to a network's layers (the
model, not the ruler).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import textwrap
from types import ModuleType
from typing import Any

import torch

from . import data, evaluators, metrics
from .config import EvaluateParams

# The methods a measurement calls on a model (as the family resolves them): how it samples and how it bounds a likelihood
MEASURING_METHODS = (
    "sample_latent",
    "noise_to_latent",
    "decode_noise",
    "decode_draws",
    "sample",
    "iwae_nlls",
    "log_prior",
    "prior_loc",
    "negative_elbo",
)


def without_docstrings(source: str) -> str:
    """The parsed source as a canonical dump, docstrings and imports dropped (comments never reach the tree), so
    moving a module into another package, which only rewrites imports, keeps the protocol."""
    tree = ast.parse(textwrap.dedent(source))
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = [n for n in node.body if not isinstance(n, ast.Import | ast.ImportFrom)]
            first = body[0] if body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                body = body[1:]
            node.body = body or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)


def helpers_called(function: Any) -> list[Any]:
    """The module-level functions of `function`'s own module that it calls by name (one level: log_normal, ...)."""
    module = inspect.getmodule(function)
    names = {n.id for n in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(function)))) if isinstance(n, ast.Name)}
    return [getattr(module, n) for n in sorted(names) if inspect.isfunction(getattr(module, n, None))]


@functools.cache  # the code does not change while a process runs
def measuring_code(family: type, modules: tuple[ModuleType, ...]) -> str:
    """A digest of the code on the measurement path of a model of class `family`."""
    sources = [inspect.getsource(m) for m in modules]
    functions = [getattr(family, name) for name in MEASURING_METHODS if hasattr(family, name)]
    functions += [helper for f in functions for helper in helpers_called(f)]
    sources += sorted({inspect.getsource(f) for f in functions})
    digest = hashlib.sha256()
    for source in sources:
        digest.update(without_docstrings(source).encode())
    return digest.hexdigest()[:16]


def describe(
    p: EvaluateParams,
    split: str,
    data_hash: str,
    evaluator_hashes: dict[str, str],
    device: torch.device | str,
    family: type,
    measuring_modules: tuple[ModuleType, ...],
) -> dict[str, Any]:
    """The protocol of a measurement of a `family` model on `split` (see the module's docstring); `measuring_modules`:
    the evaluation's own modules, hashed with the metrics, the evaluators and the data."""
    return {
        "split": split,
        "data": data_hash,
        "evaluators": dict(sorted(evaluator_hashes.items())),
        "evaluate": p.model_dump(exclude={"batch_size", "evaluators"}),
        "device": torch.device(device).type,
        "torch": str(torch.__version__),  # a plain str: the evidence file loads with weights_only
        "code": measuring_code(family, (*measuring_modules, metrics, evaluators, data)),
    }


def fingerprint(protocol: dict[str, Any]) -> str:
    """A short name of a protocol: equal fingerprints, comparable numbers."""
    return hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:16]
