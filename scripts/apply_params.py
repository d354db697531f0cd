"""Deep-merge an overrides file (params-smoke.yaml, params-paper.yaml) into a params.yaml.

Usage: python scripts/apply_params.py OVERRIDES.yaml [params.yaml]
Only the keys in OVERRIDES change; `dvc repro` (or `dvc exp run`) then sees the new values.
A key that params.yaml does not have is an error, so an override cannot silently miss.
"""
import sys
from pathlib import Path

import yaml


def merge(base: dict, overrides: dict, where: str = "") -> dict:
    for key, value in overrides.items():
        if key not in base:
            raise SystemExit(f"error: {where}{key} is not a key of params.yaml")
        if isinstance(value, dict) and isinstance(base[key], dict):
            merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = value
    return base


def main() -> None:
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    overrides = yaml.safe_load(Path(sys.argv[1]).read_text())
    target = Path(sys.argv[2] if len(sys.argv) == 3 else "params.yaml")
    params = merge(yaml.safe_load(target.read_text()), overrides)
    target.write_text(yaml.safe_dump(params, sort_keys=False))
    print(f"{target}: applied {sys.argv[1]}")


if __name__ == "__main__":
    main()
