"""mnistgen team up|down|env|status|dvc-remote  (see mnistgen/team/__init__.py)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from . import stack


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mnistgen team", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "env", "status", "dvc-remote", "drills"])
    parser.add_argument("--user", default="ci", choices=["ci", "trainer", "reader", "admin"], help="which account `env` prints")
    args = parser.parse_args(argv)
    try:
        settings = stack.Settings.load(create=args.command == "up")
        if args.command == "up":
            stack.up(settings)
            # never the secrets themselves: this output ends up in CI logs
            print(f'team: secrets in {settings.env_file}; a client sets `eval "$(mnistgen team env --user trainer|reader|ci)"`')
        elif args.command == "down":
            stack.down(settings)
        elif args.command == "env":
            print(stack.exports(settings, args.user))
        elif args.command == "status":
            print(json.dumps(stack.status(settings)))
        elif args.command == "dvc-remote":
            # the credentials go to .dvc/config.local (git-ignored by DVC), the endpoint of this stack too
            for key, value in (
                ("url", f"s3://{settings['TEAM_BUCKET']}/dvc"),
                ("endpointurl", settings.s3_endpoint),
                ("access_key_id", settings.s3_access_key),
                ("secret_access_key", settings["TEAM_S3_SECRET"]),
            ):
                subprocess.run(["dvc", "remote", "modify", "--local", "team", key, value], check=True)
            subprocess.run(["dvc", "remote", "default", "--local", "team"], check=True)
            print(
                f"team: .dvc/config.local points remote 'team' at {settings.s3_endpoint} with its credentials (the default remote)"
            )
    except (stack.StackError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
