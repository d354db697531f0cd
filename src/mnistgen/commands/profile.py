"""`mnistgen profile PROFILE.yaml [PARAMS] [-o OUT]`: apply a params profile to params.yaml, comments kept."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import profiles
from ..config import ParamsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mnistgen profile", description=profiles.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("profile", type=Path)
    parser.add_argument("params", type=Path, nargs="?", default=Path("params.yaml"))
    parser.add_argument("-o", "--out", type=Path, help="write here instead of over PARAMS")
    args = parser.parse_args(argv)
    try:
        profiles.apply_profile(args.profile, args.params, args.out or args.params)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.out or args.params}: applied {args.profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
