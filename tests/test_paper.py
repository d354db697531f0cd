"""mnistgen.commands.paper: dvc.yaml's stages without dvc or mlflow, as the paper-grade run on a bare GPU box needs."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, repo_params

from mnistgen.commands import paper as paper_run
from mnistgen.config import model_names

# A real-MNIST subset and one epoch each: the stages run for real, in under a minute on 2 cores.
TINY_PROFILE = {
    "prepare": {"limit_train": 1000, "val_size": 200, "limit_test": 500},
    "validate": {"class_fraction_min": 0.05, "class_fraction_max": 0.16},
    "train": {"grade": "smoke"},  # a subset run
    "models": {name: {"epochs": 1} for name in model_names(ROOT / "params.yaml")},
    "evaluate": {
        "num_samples": 500,
        "per_class_samples": 50,
        "num_real": 500,
        "batch_size": 250,
        "kid_subsets": 5,
        "kid_subset_size": 100,
        "is_splits": 2,
        "interp_pairs": 10,
        "iwae_k": 10,
        "iwae_images": 50,
        "bootstrap": 10,
    },
}
BLOCKED = (
    "mlflow",
    "dvc",
)  # what the GPU box lacks and does not get (great_expectations, pydantic and ruamel.yaml travel as wheels)


def test_the_runner_runs_dvc_yamls_own_commands_in_an_order_dvc_allows():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        resolved = {stage.addressing: stage.cmd for stage in repo.index.stages}
        edges = [(stage.addressing, dependency.addressing) for stage, dependency in repo.index.graph.edges]
    ours = paper_run.stage_commands(ROOT / "dvc.yaml", model_names(ROOT / "params.yaml"), repo_params())
    assert dict(ours) == resolved
    position = {name: i for i, (name, _) in enumerate(ours)}
    for stage, dependency in edges:
        assert position[dependency] < position[stage], f"{stage} runs before its dependency {dependency}"
        if "@" in stage and "@" in dependency:  # the runner chains foreach stages per model: only same-model deps allowed
            assert stage.split("@")[1] == dependency.split("@")[1], f"{stage} depends on another model's {dependency}"


def test_a_value_the_runner_does_not_know_is_an_error():
    with pytest.raises(KeyError, match=r"\$\{evaluate.seed\}"):
        paper_run.fill("python x.py --seed ${evaluate.seed}", {"paths.prepared": "data/prepared"})


def run_paper(tmp_path: Path, profile: dict, deadline: float = 600) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """The runner in a subprocess whose mlflow and dvc imports fail, as on the GPU box."""
    blocked = tmp_path / "blocked"
    for name in BLOCKED:
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU box')\n")
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(profile))
    work, out = tmp_path / "work", tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mnistgen.commands.paper",
            "--profile",
            str(tmp_path / "profile.yaml"),
            "--work",
            str(work),
            "--out",
            str(out),
            "--jobs",
            "2",
            "--deadline",
            str(deadline),
        ],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(ROOT / "src")])},
    )
    return result, work, out


@pytest.mark.slow
def test_every_stage_runs_without_dvc_or_mlflow_and_the_floors_decide(tmp_path, mnist_mirror):
    models = model_names(ROOT / "params.yaml")
    # Floors every tiny model meets, but one no model can: the runner must report that model, and only it.
    floors = {name: {"floors": [{"metric": "fid_cls", "max": 1000.0}]} for name in models}
    floors["gan"] = {"floors": [{"metric": "fid_cls", "max": 0.001}]}
    result, work, out = run_paper(tmp_path, {**TINY_PROFILE, "gate": floors})
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-4000:]  # a floor broke, every stage ran

    summary = json.loads((work / "paper_run.json").read_text())
    ran = {row["stage"]: row["status"] for row in summary["stages"]}
    expected = [name for name, _ in paper_run.stage_commands(ROOT / "dvc.yaml", models, repo_params()) if name != "promote"]
    assert sorted(ran) == sorted(expected) and set(ran.values()) == {"ok"}, ran
    for name in models:
        metrics = json.loads((work / "metrics" / "val" / f"{name}.json").read_text())
        assert 0 <= metrics["fid_cls"] < 1000, (name, metrics["fid_cls"])
        assert json.loads((work / "models" / name / "run.json").read_text())["run_id"] is None  # tracking was off
    header = next(line for line in (work / "reports" / "comparison.md").read_text().splitlines() if line.startswith("| metric"))
    assert [column.strip() for column in header.split("|")[2:-1]] == [name.upper() for name in models] + ["real data"]

    decisions = json.loads((work / "reports" / "gate_floors.json").read_text())["models"]
    assert {name: d["decision"] for name, d in decisions.items()} == {
        name: "reject" if name == "gan" else "promote" for name in models
    }
    with tarfile.open(out / "paper_run.tar.gz") as tar:
        packed = set(tar.getnames())
    assert {
        "paper_run.json",
        "params.yaml",
        "metrics/val/vae.json",
        "metrics/test/vae.json",
        "reports/gate_floors.md",
        "logs/train@cwgan.log",
    } <= packed
    assert "epochs: 1" in (work / "params.yaml").read_text()  # the profile was merged in


@pytest.mark.slow
def test_a_failing_stage_stops_the_run_and_its_results_still_come_back(tmp_path, mnist_mirror):
    tampered = tmp_path / "tampered"  # the pinned ruler with one weight file changed: the reference stage refuses it
    shutil.copytree(ROOT / "evaluators" / "v1", tampered)
    (tampered / "classifier2.pt").write_bytes((tampered / "classifier2.pt").read_bytes() + b"\0")
    profile = {**TINY_PROFILE, "evaluate": {**TINY_PROFILE["evaluate"], "evaluators": str(tampered)}}
    result, work, out = run_paper(tmp_path, profile)
    assert result.returncode == 2, (result.stdout + result.stderr)[-4000:]
    ran = {row["stage"]: row["status"] for row in json.loads((work / "paper_run.json").read_text())["stages"]}
    assert ran["prepare"] == ran["validate"] == "ok" and ran["reference"] == "failed (exit 1)"
    assert {status for name, status in ran.items() if name not in ("prepare", "validate", "reference")} == {
        "not run (an earlier stage did not succeed)"
    }
    assert "does not match the pinned" in result.stdout  # the failed stage's log is shown
    with tarfile.open(out / "paper_run.tar.gz") as tar:
        assert "does not match the pinned" in tar.extractfile("logs/reference.log").read().decode()


@pytest.mark.slow
def test_the_deadline_kills_the_stage_in_flight_and_the_results_still_come_back(tmp_path, mnist_mirror):
    # 1,000 AE epochs take minutes here; the deadline comes long before (earlier still on a slow machine)
    slow = {**TINY_PROFILE, "models": {**TINY_PROFILE["models"], "ae": {"epochs": 1000}}}
    result, work, out = run_paper(tmp_path, slow, deadline=15)
    assert result.returncode == 2, (result.stdout + result.stderr)[-4000:]
    summary = json.loads((work / "paper_run.json").read_text())
    statuses = [row["status"] for row in summary["stages"]]
    killed = statuses.index("killed (deadline passed)")  # the stages in flight (model chains run side by side) are killed
    assert set(statuses[:killed]) <= {"ok"} and all(s.startswith(("not run", "killed")) for s in statuses[killed + 1 :]), statuses
    assert summary["seconds"] < 45  # killed at the deadline, not when the stage would have ended
    assert (out / "paper_run.tar.gz").exists()
