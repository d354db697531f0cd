"""`mnistgen team up|down|restart|env|status|dvc-remote|drills`: team mode's stack (docs/team.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..team import drills, stack
from ..team.settings import Settings, StackError, dvc_remote_config, exports


def set_dvc_remote(settings: Settings, user: str, repo_dir: Path = Path()) -> Path:
    """Remote 'team' of this repository, with `user`'s S3 key, as the default: written through DVC's own config API into
    .dvc/config.local (git-ignored by DVC), 0600, so the secret is never on a command line."""
    from dvc.repo import Repo

    config = dvc_remote_config(settings, user)
    old_umask = os.umask(0o077)  # the file is private from its first byte
    try:
        with Repo(str(repo_dir)) as repo, repo.config.edit("local") as local:
            local["remote"]["team"] = config
            local["core"]["remote"] = "team"
            path = Path(repo.dvc_dir) / "config.local"
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return path


def main(argv=None) -> int:
    if argv and argv[0] == "drills":
        return drills.main(argv[1:])
    parser = argparse.ArgumentParser(prog="mnistgen team", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "restart", "env", "status", "dvc-remote", "drills"])
    parser.add_argument(
        "--user", default="ci", choices=["ci", "trainer", "reader", "admin"], help="whose account `env` and `dvc-remote` use"
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.load(create=args.command in ("up", "restart"))
        if args.command in ("up", "restart"):
            (stack.up if args.command == "up" else stack.restart)(settings)
            # never the secrets themselves: this output ends up in CI logs
            print(f'team: secrets in {settings.env_file}; a client sets `eval "$(mnistgen team env --user trainer|reader|ci)"`')
        elif args.command == "down":
            stack.down(settings)
        elif args.command == "env":
            print(exports(settings, args.user))
        elif args.command == "status":
            print(json.dumps(stack.status(settings)))
        elif args.command == "dvc-remote":
            path = set_dvc_remote(settings, args.user)
            print(f"team: {path} points remote 'team' at {settings.s3_endpoint} with {args.user}'s key (the default remote)")
    except StackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
