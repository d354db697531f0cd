"""dvc.yaml tells the truth: each stage depends on exactly the library modules its script imports,
takes every path from its command line, and an edit reruns exactly the stages that read it."""

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

from mnistgen.commands import smoke
from mnistgen.config import model_names

# Files a stage reads as code without importing them: the logged model's own code.
READ_AS_FILES = {"train": {"src/mnistgen/pyfunc_model.py"}}
PROBE = """
import importlib, json, sys
before = set(sys.modules)
found = {}
for name in sys.argv[1:]:  # each stage module's own closure: what importing it alone brings in
    for key in [k for k in sys.modules if k.split(".")[0] == "mnistgen"]:
        del sys.modules[key]
    importlib.import_module(name)
    found[name] = sorted(m.__file__ for key, m in sys.modules.items() if key.split(".")[0] == "mnistgen")
print(json.dumps(found))
"""


def stages() -> dict[str, dict]:
    """Stage name -> definition (a foreach stage's `do`), straight from dvc.yaml."""
    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in raw.items()}


def code_deps(stage: dict) -> set[str]:
    """The stage's deps under src/, a folder expanded to its .py files."""
    out = set()
    for dep in stage["deps"]:
        path = ROOT / dep
        if dep.startswith("src/"):
            out |= {str(p.relative_to(ROOT)) for p in path.rglob("*.py")} if path.is_dir() else {dep}
    return out


def stage_module(stage: dict) -> str:
    return re.search(r"python -m (mnistgen\.stages\.\w+)", stage["cmd"]).group(1)


@functools.cache
def imports_of_every_stage() -> dict[str, set[str]]:
    """Every stage module's imported package files, probed in one fresh interpreter."""
    modules = sorted({stage_module(stage) for stage in stages().values()})
    result = subprocess.run([sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    return {m: {str(Path(f).resolve().relative_to(ROOT)) for f in files} for m, files in found.items()}


def imported(module: str) -> set[str]:
    return imports_of_every_stage()[module]


@pytest.mark.parametrize("name", list(stages()))
def test_each_stage_depends_on_exactly_the_modules_it_imports(name):
    stage = stages()[name]
    module = stage_module(stage)
    script = "src/" + module.replace(".", "/") + ".py"
    assert script in stage["deps"], f"{name}: its module {script} is not a dep"
    assert code_deps(stage) == imported(module) | READ_AS_FILES.get(name, set())


@pytest.mark.parametrize("name", list(stages()))
def test_every_path_a_stage_uses_is_on_its_command_line(name):
    """Each --flag PATH in the command is a dep or an output, and the scripts hard-code no data paths."""
    stage = stages()[name]
    declared = set(stage["deps"]) | {
        next(iter(o)) if isinstance(o, dict) else o for key in ("outs", "metrics") for o in stage.get(key, [])
    }
    for flag, path in re.findall(r"(--[\w-]+) (\S+)", stage["cmd"]):
        assert path in declared or any(d.startswith(path.rstrip("/") + "/") for d in declared), (name, flag, path)
    script = "src/" + re.search(r"python -m (mnistgen\.stages\.\w+)", stage["cmd"]).group(1).replace(".", "/") + ".py"
    source = (ROOT / script).read_text()
    for literal in ("data/prepared", "data/validat", "models/evaluator", '"metrics', '"reports'):
        assert literal not in source.split('"""', 2)[-1], f"{script} hard-codes {literal}"


@pytest.fixture(scope="module")
def committed_workspace(tmp_path_factory):
    """A scratch copy of the repo whose dvc.lock matches its files: every output stands in as a placeholder."""
    from dvc.repo import Repo

    work = smoke.make_workspace(tmp_path_factory.mktemp("graph"), None)
    for stage in Repo(str(work)).index.stages:
        for out in stage.outs:
            path = Path(out.fs_path)
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}")
            else:
                path.mkdir(parents=True, exist_ok=True)
                (path / "placeholder").write_text("x")
    assert dvc("commit", "-f", cwd=work).returncode == 0
    assert changed_stages(work) == set()
    return work


def dvc(*args, cwd):
    return subprocess.run(
        [str(Path(sys.executable).with_name("dvc")), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def changed_stages(work: Path) -> set[str]:
    result = dvc("status", "--json", cwd=work)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout or "{}"))


def edited(work: Path, rel: str, old: str | None = None, new: str | None = None) -> set[str]:
    """The stages `dvc status` reports after editing one file (a comment appended, or old -> new); the edit is undone."""
    path = work / rel
    before = path.read_text()
    path.write_text(before.replace(old, new, 1) if old else before + "\n# edited\n")
    try:
        return changed_stages(work)
    finally:
        path.write_text(before)


MODELS = model_names(ROOT / "params.yaml")
EVERY = {
    "prepare",
    "validate",
    "reference",
    "report",
    "promote",
    *(f"{s}@{m}" for s in ("train", "evaluate") for m in MODELS),
}
EVALUATE = {f"evaluate@{m}" for m in MODELS}
TRAIN_EVALUATE = {f"{s}@{m}" for s in ("train", "evaluate") for m in MODELS}


@pytest.mark.slow
@pytest.mark.parametrize(
    "rel, old, new, expected",
    [
        ("src/mnistgen/evaluators.py", None, None, {"reference", "report", "promote", *EVALUATE}),
        ("src/mnistgen/registry.py", None, None, {"promote"}),
        ("src/mnistgen/comparison.py", None, None, {"promote"}),
        ("src/mnistgen/gate.py", None, None, {"promote", "report"}),  # the report card prints its decisions
        ("src/mnistgen/report.py", None, None, {"report"}),
        ("src/mnistgen/models/vae.py", None, None, {"promote", *TRAIN_EVALUATE}),  # promote may re-measure a champion
        ("src/mnistgen/figures.py", None, None, {"report", "promote", *TRAIN_EVALUATE}),
        ("src/mnistgen/config.py", None, None, EVERY),
        ("src/mnistgen/utils.py", None, None, EVERY),
        ("src/mnistgen/data.py", None, None, EVERY),
        ("src/mnistgen/metrics.py", None, None, {"report", "promote", *EVALUATE}),
        ("params.yaml", "iwae_k: 1000", "iwae_k: 500", {"report", "promote", *EVALUATE}),
        ("params.yaml", "num_real: 10000", "num_real: 5000", {"reference", "report", "promote", *EVALUATE}),
        ("params.yaml", "beta: 1.0", "beta: 0.5", {"train@vae", "report", "promote"}),
        ("params.yaml", "bootstrap: 100", "bootstrap: 50", {"report", "promote", *EVALUATE}),
        # the evaluators' recipe is read by `mnistgen evaluator train` alone: editing it never retrains the ruler
        ("params.yaml", "  width: 16\n  epochs: 3", "  width: 16\n  epochs: 2", set()),
        ("params.yaml", "  alpha: 0.05 ", "  alpha: 0.01 ", {"promote"}),
    ],
)
def test_an_edit_reruns_exactly_the_stages_that_read_it(committed_workspace, rel, old, new, expected):
    if old:
        assert old in (committed_workspace / rel).read_text(), f"{old!r} not in {rel}"
    assert edited(committed_workspace, rel, old, new) == expected


def test_the_repo_names_no_default_remote():
    """DVC builds the default remote's filesystem for `dvc plots show` and queued experiments: the team's S3 remote
    as the repo's default would make both fail in a checkout without the team extra (no dvc-s3). `mnistgen team
    dvc-remote` makes it the default in .dvc/config.local instead (the pull-request test pushes through it)."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    assert "remote" not in config["core"], dict(config["core"])
    team = next(name for name in config.sections() if 'remote "team"' in name)  # DVC writes ['remote "team"']
    assert config[team]["url"].startswith("s3://")
