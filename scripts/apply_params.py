"""Deep-merge an overrides file (params-smoke.yaml, params-paper.yaml) into a params.yaml.

Usage: python scripts/apply_params.py OVERRIDES.yaml [params.yaml]
Only the keys in OVERRIDES change; `dvc repro` (or `dvc exp run`) then sees the new values.
A key that params.yaml does not have is an error, so an override cannot silently miss.
"""
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mnistgen.config import ParamsError, read_merged_params  # noqa: E402


def main() -> None:
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    target = Path(sys.argv[2] if len(sys.argv) == 3 else "params.yaml")
    try:
        params = read_merged_params(sys.argv[1], target)
    except ParamsError as err:
        raise SystemExit(f"error: {sys.argv[1]}: {err}") from err
    target.write_text(yaml.safe_dump(params, sort_keys=False))
    print(f"{target}: applied {sys.argv[1]}")


if __name__ == "__main__":
    main()
