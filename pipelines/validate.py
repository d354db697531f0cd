"""Stage validate: check the prepared splits with a Great Expectations suite (labels, shapes,
dtype, intensity bands, row counts, class balance, train/val-test duplicates); write
result.json and summary.md atomically; exit 1 naming every failed expectation (the
report is still written so it can be read).

Usage: python pipelines/validate.py --data data/prepared --out data/validation   (paths from dvc.yaml)
"""
import argparse
import json
import sys
import time
from pathlib import Path

from mnistgen import data, validation
from mnistgen.config import ValidateParams, load_section
from mnistgen.utils import StageError, atomic_dir, atomic_write_text, run_stage


def expected_sizes(prepared: Path) -> dict[str, int]:
    path = prepared / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise StageError(f"{path}: not found; run `dvc repro prepare` first") from err
    except (OSError, ValueError) as err:
        raise StageError(f"{path}: cannot read prepare's metadata ({err})") from err
    sizes = meta.get("sizes") if isinstance(meta, dict) else None
    if not isinstance(sizes, dict):
        raise StageError(f"{path}: no 'sizes' mapping; rerun `dvc repro prepare`")
    missing = [name for name in data.SPLITS if not isinstance(sizes.get(name), int)]
    if missing:
        raise StageError(f"{path}: sizes has no integer count for split {missing[0]!r}")
    return {name: sizes[name] for name in data.SPLITS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    params = load_section(ValidateParams, "validate")
    sizes = expected_sizes(args.data)
    splits = {name: data.load_split(args.data, name) for name in data.SPLITS}
    table = validation.image_table(splits)
    result = validation.validate(table, sizes, params)
    with atomic_dir(args.out) as tmp:
        atomic_write_text(tmp / "result.json", result.to_json())
        atomic_write_text(tmp / "summary.md", result.to_markdown())
    print(f"{result.summary_line()} ({time.perf_counter() - started:.1f} s; report in {args.out}/summary.md)")
    if not result.success:
        for line in result.failure_lines():
            print(f"FAILED {line}", file=sys.stderr)
        raise StageError(f"data validation failed: {len(result.failed)} expectation(s) not met, see {args.out}/summary.md")


if __name__ == "__main__":
    run_stage(main)
