"""`mnistgen evaluator train --out evaluators/vN`: a new pinned ruler (a new protocol) from params.yaml's recipes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import data
from ..config import EvaluatorParams, ParamsError, load_section
from ..evaluators import FEATURE_SPACES, train_pinned
from ..utils import StageError


def main(argv: list[str] | None = None) -> int:
    """`mnistgen evaluator train --out evaluators/v2`: a new pinned ruler from params.yaml's evaluator recipes."""
    parser = argparse.ArgumentParser(prog="mnistgen evaluator", description=main.__doc__)
    parser.add_argument("action", choices=["train"])
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--out", type=Path, required=True, help="a new folder, e.g. evaluators/v2 (its name is the version)")
    args = parser.parse_args(argv)
    try:
        if args.out.exists():
            raise StageError(f"{args.out}: exists; a pinned version is never overwritten, choose a new one")
        recipes = {space.section: load_section(EvaluatorParams, space.section) for space in FEATURE_SPACES}
        train, val = data.load_split(args.data, "train"), data.load_split(args.data, "val")
        manifest = train_pinned(
            data.to_float(train.images),
            train.labels,
            data.to_float(val.images),
            val.labels,
            recipes,
            args.out,
            args.out.name,
            data.split_hashes(args.data)["train"],
        )
    except (StageError, ParamsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.out}: pinned evaluators {manifest['version']}; set evaluate.evaluators: {args.out} in params.yaml to use them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
