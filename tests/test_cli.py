"""`mnistgen`, the one console script: every subcommand is listed and reaches its own parser."""

import subprocess
import sys
from pathlib import Path

import pytest

from mnistgen import cli

MNISTGEN = str(Path(sys.executable).with_name("mnistgen"))  # the console script pyproject declares


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MNISTGEN, *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for command in ("team", "sweep", "profile", "serve", "smoke", "bench", "paper"):
        assert command in cli.COMMANDS and f"mnistgen {command}" in result.stdout, command


@pytest.mark.parametrize(
    "args, prog",
    [
        (("team", "--help"), "mnistgen team"),
        (("team", "drills", "--help"), "mnistgen team drills"),
        (("sweep", "--help"), "mnistgen sweep"),
        (("profile", "--help"), "mnistgen profile"),
        (("serve", "--help"), "mnistgen serve"),
        (("smoke", "--help"), "mnistgen smoke"),
        (("paper", "--help"), "mnistgen paper"),
        (("bench", "train", "--help"), "benchmark_train.py"),
    ],
)
def test_each_subcommand_reaches_its_own_parser(args, prog):
    result = run(*args)
    assert result.returncode == 0 and f"usage: {prog}" in result.stdout, result.stdout + result.stderr


def test_an_unknown_command_or_benchmark_is_refused_with_the_choices():
    unknown = run("train")
    assert unknown.returncode == 2 and "invalid choice: 'train'" in unknown.stderr
    bench = run("bench", "nothing")
    assert bench.returncode == 2 and "usage: mnistgen bench {train,ddp,clock,elbo,gpu}" in bench.stderr
