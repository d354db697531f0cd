"""`mnistgen`, the one console script: every subcommand is listed once, reaches its own parser, and is imported only
when it runs, so `mnistgen --help` loads neither torch nor MLflow."""

import subprocess
import sys
from pathlib import Path

import pytest

from mnistgen import cli
from mnistgen.commands import bench

MNISTGEN = str(Path(sys.executable).with_name("mnistgen"))  # the console script pyproject declares


def test_help_lists_every_subcommand_once_from_one_table(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name, (_, help) in cli.COMMANDS.items():
        assert out.count(f"\n  {name} ") == 1 and help in out, name


def test_help_imports_no_subcommand_and_neither_torch_nor_mlflow():
    probe = (
        "import sys\nfrom mnistgen import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('torch', 'mlflow', 'optuna', 'dvc', 'mnistgen.commands.')\n"
        "print(sorted({m.split('.')[0] if not m.startswith('mnistgen') else m for m in sys.modules if m.startswith(heavy)}))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr


def test_the_console_script_runs():
    result = subprocess.run([MNISTGEN, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "commands:" in result.stdout and "`mnistgen COMMAND --help`" in result.stdout


@pytest.mark.parametrize(
    "args, prog",
    [
        (("team", "--help"), "mnistgen team"),
        (("team", "drills", "--help"), "mnistgen team drills"),
        (("sweep", "--help"), "mnistgen sweep"),
        (("seeds", "--help"), "mnistgen seeds"),
        (("registry", "--help"), "mnistgen registry"),
        (("pr", "--help"), "mnistgen pr"),
        (("evaluator", "--help"), "mnistgen evaluator"),
        (("profile", "--help"), "mnistgen profile"),
        (("serve", "--help"), "mnistgen serve"),
        (("smoke", "--help"), "mnistgen smoke"),
        (("paper", "--help"), "mnistgen paper"),
    ],
)
def test_each_subcommand_reaches_its_own_parser(args, prog, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(list(args))
    assert done.value.code == 0
    assert f"usage: {prog}" in capsys.readouterr().out


def test_an_unknown_command_or_benchmark_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["train"])
    assert done.value.code == 2 and "invalid choice: 'train'" in capsys.readouterr().err
    assert cli.main(["bench", "nothing"]) == 2
    err = capsys.readouterr().err
    assert "usage: mnistgen bench NAME" in err and all(f"  {name} " in err for name in bench.BENCHMARKS)


def test_bench_says_plainly_that_it_needs_a_source_checkout(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "REPO", tmp_path)  # an installed package: no benchmarks/ beside it
    assert cli.main(["bench", "train"]) == 2
    assert "runs the scripts of a source checkout" in capsys.readouterr().err
