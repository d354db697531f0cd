"""Parameter profiles: files of overrides (params-smoke.yaml, params-paper.yaml) applied to params.yaml.

The merge is done on ruamel.yaml's round-trip tree, so params.yaml keeps its comments, order and
layout; only the overridden values change. A key that params.yaml does not have is an error, so
an override cannot silently miss. Lists (such as a gate's floors) are replaced whole.

    mnistgen profile params-smoke.yaml              # rewrite params.yaml in place
    mnistgen profile params-paper.yaml -o other.yaml
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .config import ParamsError


def _yaml():
    from ruamel.yaml import YAML  # imported here: only this tool needs it, not the training library

    yaml = YAML()  # round-trip: comments and key order survive
    yaml.preserve_quotes = True
    yaml.width = 130
    return yaml


def merge(base: Any, overrides: dict, where: str = "") -> Any:
    """Write each value of `overrides` into `base` in place; mappings merge key by key."""
    for key, value in overrides.items():
        if key not in base:
            raise ParamsError(f"profile: {where}{key} is not a key of params.yaml")
        if isinstance(value, dict) and isinstance(base[key], dict):
            merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = value
    return base


def apply_profile(profile: str | Path, params: str | Path = "params.yaml", out: str | Path | None = None) -> str:
    """params.yaml with `profile` applied, as text (also written to `out` when given)."""
    yaml = _yaml()
    try:
        base = yaml.load(Path(params).read_text())
        overrides = yaml.load(Path(profile).read_text()) or {}
    except OSError as err:
        raise ParamsError(f"{err.filename}: cannot read ({err.strerror})") from err
    merge(base, overrides)
    buffer = io.StringIO()
    yaml.dump(base, buffer)
    if out is not None:
        Path(out).write_text(buffer.getvalue())
    return buffer.getvalue()


def load_profiled(profile: str | Path | None, params: str | Path = "params.yaml") -> dict:
    """The params as plain dicts, with `profile` applied when given (for scripts that read, not write)."""
    import yaml

    text = Path(params).read_text() if profile is None else apply_profile(profile, params)
    return yaml.safe_load(text)
