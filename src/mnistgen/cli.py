"""`mnistgen`: the one command for everything a user starts by hand.

The pipeline itself runs through DVC (`dvc repro`), whose stages are the modules of mnistgen.stages; the
MLproject entry points call `dvc repro` too. Everything else starts here:

    mnistgen team up|down|restart|status|env|dvc-remote|drills  team mode (PostgreSQL, Swift S3, mlflow server)
    mnistgen sweep MODEL [--trials N ...]                an Optuna search on the validation split
    mnistgen seeds [--models M ...] [--seeds 1 2]        the default run's spread over training seeds
    mnistgen registry history|rollback MODEL ...         who was @champion when; move it back (recorded)
    mnistgen pr check|promote                            team mode: verify a pull request's pulled run; promote it on merge
    mnistgen evaluator train --out evaluators/vN         a new pinned ruler (a new protocol)
    mnistgen profile PROFILE.yaml                        apply a params profile to params.yaml
    mnistgen serve MODEL [--alias champion]              serve a registered version over HTTP
    mnistgen smoke [--workdir DIR]                       the whole pipeline on a small real subset
    mnistgen bench NAME [ARGS ...]                       a benchmark of benchmarks/ (train, ddp, clock, elbo, gpu)
    mnistgen paper [ARGS ...]                            the paper-grade run without dvc or mlflow

`smoke`, `bench` and `paper` need the repository this package is installed from (pip install -e .):
they drive its dvc.yaml, params files and benchmark scripts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import evaluators, paper, profiles, pull_request, registry, seeds, smoke, sweep
from .team import __main__ as team_main
from .team import drills

REPO = Path(__file__).resolve().parents[2]  # the checkout of an editable install
BENCHMARKS = {
    "train": "benchmark_train.py",  # the harness against the per-sample baseline, images per second
    "ddp": "ddp_throughput.py",  # one process against N, images per second
    "clock": "quality_at_fixed_clock.py",  # quality at a fixed CPU budget, both feature spaces
    "elbo": "vae_time_to_elbo.py",  # the VAE's time to a test -ELBO against the PyTorch example's
    "gpu": "gpu_check.py",  # step times and bf16 against fp32 on a GPU
}


def repo_script(relative: str, argv: list[str]) -> int:
    """`python <script> argv...` for a script of the repository; its exit status."""
    script = REPO / relative
    if not script.exists():
        print(f"error: {script} not found: this command needs the repository (pip install -e .)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *argv])


def serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mnistgen serve", description="Serve mnist-<MODEL>@<alias> with `mlflow models serve`.")
    parser.add_argument("model", help="ae, vae, gan, wgan, cvae or cwgan")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args(argv)
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    command = [
        mlflow,
        "models",
        "serve",
        "-m",
        f"models:/mnist-{args.model}@{args.alias}",
        "--env-manager",
        "local",
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    os.execv(command[0], command)  # the server replaces this process, so signals reach it directly
    return 0  # not reached


COMMANDS = {
    "team": lambda argv: drills.main(argv[1:]) if argv[:1] == ["drills"] else team_main.main(argv),
    "sweep": sweep.main,
    "seeds": seeds.main,
    "registry": registry.main,
    "pr": pull_request.main,
    "evaluator": evaluators.main,
    "profile": profiles.main,
    "serve": serve,
    "smoke": smoke.main,
    "bench": lambda argv: (
        repo_script(f"benchmarks/{BENCHMARKS[argv[0]]}", argv[1:]) if argv[:1] and argv[0] in BENCHMARKS else bench_usage()
    ),
    "paper": paper.main,
}


def bench_usage() -> int:
    print("usage: mnistgen bench {" + ",".join(BENCHMARKS) + "} [ARGS ...]", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="mnistgen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS, help="what to start; `mnistgen COMMAND --help` for its options")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv[:1])
    return COMMANDS[args.command](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
