"""Grades that are earned: a run's claimed grade (train.grade) holds only when its recipe is that grade's.

A model's recipe is what makes its weights, the seed aside: the data (section `prepare`) and its own section
`models.<name>`. The train stage tags every run with its claim (`grade`) and its recipe's hash (`recipe`);
promotion grades it:
- `smoke`: always (the lowest grade a run can claim);
- `default`: when the recipe is that of params.yaml as committed (git HEAD), so an edited, uncommitted params.yaml
  or a `dvc exp run -S ...` is not the default;
- `paper`: when it is that of params.yaml as committed with params-paper.yaml applied;
- any claim that does not hold, or that is not known: `experiment`, params being tried, which never displaces a
  default or paper champion (GRADES orders them). A run with no claim at all has no grade (refused in team mode).
Sweep trials are graded `sweep` by the sweep; they are not registered.
"""

from __future__ import annotations

from typing import Any

from .utils import sha256_json

EXPERIMENT = "experiment"


def with_profile(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with a profile's overrides applied (mappings merged key by key); keys `base` lacks are left out, as a
    model the params do not have has no recipe to grade."""
    out = dict(base)
    for key, value in overrides.items():
        if key in out:
            out[key] = with_profile(out[key], value) if isinstance(value, dict) and isinstance(out[key], dict) else value
    return out


def recipe(params: dict[str, Any], model: str) -> dict[str, Any]:
    """What makes model `model`'s weights besides the seed."""
    return {"prepare": params.get("prepare"), "model": (params.get("models") or {}).get(model)}


def recipe_hash(params: dict[str, Any], model: str) -> str:
    return sha256_json(recipe(params, model))[:16]


def earned(
    claim: str | None, recipe_of_run: str | None, profiles: dict[str, dict[str, Any] | None], model: str
) -> tuple[str, str]:
    """The grade a run earns and why. `profiles` maps `default` and `paper` to the committed params of that grade
    (None where they cannot be read, e.g. outside a git checkout)."""
    if claim is None:
        return "unknown", "the run has no grade tag"
    if claim == "smoke":
        return "smoke", "smoke, as claimed"
    if claim not in profiles:
        return EXPERIMENT, f"claims {claim!r}, not a grade a run can earn"
    committed = profiles[claim]
    if committed is None:
        return EXPERIMENT, f"claims {claim}, but the committed {claim} params cannot be read (not a git checkout?)"
    if recipe_of_run is None:
        return EXPERIMENT, f"claims {claim}, but the run has no recipe tag"
    if recipe_hash(committed, model) != recipe_of_run:
        return EXPERIMENT, f"claims {claim}, but its recipe (prepare, models.{model}) is not the committed {claim} one"
    return claim, f"{claim}: its recipe is the committed one"
