"""Time a `dvc repro` per stage: run it, stamp each "Running stage" line, print the seconds of each stage.

Run it in a fresh clone for a cold figure (nothing in the DVC cache):
    python benchmarks/repro_stages.py [--out FILE.json] [-- extra dvc repro arguments]
A stage's seconds run from its "Running stage" line to the next one (or to the end), so they include its
process start-up and DVC's hashing of its outputs.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time

STAGE_LINE = re.compile(r"Running stage '([^']+)'")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the seconds per stage to this JSON file")
    parser.add_argument("dvc_args", nargs="*", help="passed to dvc repro (after --)")
    args = parser.parse_args()

    start = time.perf_counter()
    starts: list[tuple[str, float]] = []
    proc = subprocess.Popen(["dvc", "repro", *args.dvc_args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.perf_counter() - start
        sys.stdout.write(f"[{now:7.1f}s] {line}")
        match = STAGE_LINE.search(line)
        if match:
            starts.append((match.group(1), now))
    code = proc.wait()
    total = time.perf_counter() - start

    ends = [t for _, t in starts[1:]] + [total]
    seconds = {name: round(end - begun, 1) for (name, begun), end in zip(starts, ends)}
    print(f"\n{'stage':<20} {'seconds':>8}")
    for name, value in seconds.items():
        print(f"{name:<20} {value:8.1f}")
    print(f"{'total':<20} {total:8.1f}   (dvc repro exit {code})")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"stages": seconds, "total": round(total, 1), "exit": code}, handle, indent=2)
    sys.exit(code)


if __name__ == "__main__":
    main()
