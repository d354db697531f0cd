"""Stage validate: check the prepared splits with a Great Expectations suite (labels, shapes,
dtype, intensity bands, row counts, class balance, train/val-test duplicates); write
result.json and summary.md atomically; exit 1 naming every failed expectation (the
report is still written so it can be read).

On success it also writes --passed: the prepared data's hashes and sizes, which is all the
later stages depend on. The report holds the thresholds, Great Expectations' ids and the
seconds taken, so it changes on every run; the passed record changes only with the data, and
a threshold edited so that the data still passes retrains nothing.

Usage: python -m mnistgen.stages.validate --data data/prepared --out data/validation --passed data/validated.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

from mnistgen import data, validation
from mnistgen.config import ValidateParams, load_section
from mnistgen.utils import StageError, atomic_dir, atomic_write_text, run_stage, write_json


def read_meta(prepared: Path) -> dict:
    path = prepared / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise StageError(f"{path}: not found; run `dvc repro prepare` first") from err
    except (OSError, ValueError) as err:
        raise StageError(f"{path}: cannot read prepare's metadata ({err})") from err
    for key in ("sizes", "sha256"):
        if not isinstance(meta, dict) or not isinstance(meta.get(key), dict):
            raise StageError(f"{path}: no {key!r} mapping; rerun `dvc repro prepare`")
    missing = [name for name in data.SPLITS if not isinstance(meta["sizes"].get(name), int)]
    if missing:
        raise StageError(f"{path}: sizes has no integer count for split {missing[0]!r}")
    return meta


@data.reads_test("validate")  # one of the readers of the test split (data.TEST_READERS)
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--passed", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    params = load_section(ValidateParams, "validate")
    meta = read_meta(args.data)
    sizes = {name: meta["sizes"][name] for name in data.SPLITS}
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
    write_json(args.passed, {"sizes": sizes, "sha256": meta["sha256"]})


if __name__ == "__main__":
    run_stage(main)
