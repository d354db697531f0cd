"""`mnistgen`: the one command for everything a user starts by hand; the pipeline itself runs through `dvc repro`.

Each subcommand is a module of mnistgen.commands, imported only when it runs, so `mnistgen --help` starts at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module of mnistgen.commands, what it does): the one list of subcommands and their help
COMMANDS = {
    "team": ("team", "team mode: up|down|restart|status|env|dvc-remote|drills (PostgreSQL, Swift S3, mlflow server)"),
    "sweep": ("sweep", "MODEL --trials N: an Optuna search on the validation split, trials as nested MLflow runs"),
    "seeds": ("seeds", "retrain with other seeds: the training noise the gate and the results table use"),
    "registry": ("registry", "history|rollback MODEL: every move of @champion; move it back (recorded)"),
    "pr": ("pr", "check|promote: CI on a team pull request: pull a teammate's run, check it, the gate"),
    "evaluator": ("evaluator", "train --out evaluators/vN: a new pinned ruler (a new protocol)"),
    "profile": ("profile", "PROFILE.yaml: apply a params profile (smoke, paper) to params.yaml"),
    "serve": ("serve", "MODEL [--alias champion]: serve a registered version over HTTP"),
    "smoke": ("smoke", "the whole pipeline on a small real subset, in a scratch copy"),
    "bench": ("bench", "NAME [ARGS]: a benchmark of the source checkout (train, ddp, clock, elbo, gpu, gate)"),
    "paper": ("paper", "--out OUT: the paper-grade profile on a GPU box without dvc or mlflow"),
}


def parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:10s} {help}" for name, (_, help) in COMMANDS.items())
    made = argparse.ArgumentParser(
        prog="mnistgen",
        description=__doc__,
        epilog=f"commands:\n{listing}\n\n`mnistgen COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    made.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of the commands below")
    made.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return made


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv[:1])
    module = importlib.import_module(f"mnistgen.commands.{COMMANDS[args.command][0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
