"""Two recipes' seeds side by side: each headline figure's seed mean under B against A's, in units of A's training sd.

Usage (from the repo root), e.g. the seeds of the committed fp32 recipe against today's:
    git show HEAD~1:metrics/seeds/vae.json > /tmp/fp32/vae.json   # one file per model, as `mnistgen seeds` writes
    python benchmarks/compare_seeds.py /tmp/fp32 metrics/seeds [--split val]

Both folders must hold `mnistgen seeds` summaries measured under one protocol (the same `protocol` digest), so that
only the training differs. A change passes when no figure of any model is worse by more than A's training sd
("worse" is up for FID, MSE and the IWAE bound, down for the rest); the exit status is 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LOWER_IS_BETTER = ("fid_cls", "kid_cls", "recon_mse", "iwae_nll")  # prefixes; label_fidelity is not a FID


def worse_by(key: str, a_mean: float, b_mean: float) -> float:
    """How much worse B's mean is than A's (positive = worse)."""
    lower_is_better = key.startswith(LOWER_IS_BETTER)
    return b_mean - a_mean if lower_is_better else a_mean - b_mean


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="folder of seed summaries: the reference recipe")
    parser.add_argument("b", type=Path, help="folder of seed summaries: the changed recipe")
    parser.add_argument("--split", default="val", choices=["val", "test"])
    args = parser.parse_args()
    failed = []
    print(f"{'model':<6} {'figure':<22} {'A mean':>10} {'A sd':>9} {'B mean':>10} {'B sd':>9} {'worse, in A sds':>16}")
    for a_file in sorted(args.a.glob("*.json")):
        a, b = json.loads(a_file.read_text()), json.loads((args.b / a_file.name).read_text())
        if a["protocol"] != b["protocol"]:
            print(f"error: {a_file.stem}: the two were measured under different protocols", file=sys.stderr)
            return 2
        for key, sa in a["spread"][args.split].items():
            sb = b["spread"][args.split][key]
            units = worse_by(key, sa["mean"], sb["mean"]) / sa["sd"]
            print(
                f"{a_file.stem:<6} {key:<22} {sa['mean']:>10.4g} {sa['sd']:>9.3g} {sb['mean']:>10.4g} {sb['sd']:>9.3g} {units:>16.2f}"
            )
            if units > 1:
                failed.append(f"{a_file.stem} {key}")
    print(f"\nworse by more than one sd: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
