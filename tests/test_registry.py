"""The promotion gate against a real SQLite registry, the pyfunc by alias, and serving.

Every test has its own workspace and store, builds the registry state it needs itself (with
only the models it needs in params.yaml), and asserts relative to what it created, so the
tests run alone, in any order, or in parallel.
"""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import clear_registry, use_team_account
from helpers import post_invocation, served_model, tiny, tiny_model_params, write_params
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mnistgen import gate, tracking
from mnistgen.config import Floor, GateParams
from mnistgen.models import build_model
from mnistgen.registry import Registry, registered_name
from mnistgen.utils import write_json

GOOD = {
    "ae": {"recon_mse": 0.012, "fid_cls": 40.0},
    "vae": {"recon_mse": 0.02, "iwae_nll": 100.0, "fid_cls": 20.0},
    "gan": {"fid_cls": 10.0, "precision": 0.7, "recall": 0.5, "classes_present": 10},
    "wgan": {"fid_cls": 20.0, "precision": 0.6, "recall": 0.5, "classes_present": 10},
}
GATE = {  # the tests' own gate, independent of the repo's floors
    name: {
        "primary": "fid_cls",
        "higher_is_better": False,
        "min_improvement": 0.0,
        "tolerance": 0.5,
        "agree_in_both_spaces": True,
        "floors": [
            {"metric": "fid_cls", "max": 60.0},
            *([{"metric": "classes_present", "min": 8}] if name in ("gan", "wgan") else []),
        ],
    }
    for name in GOOD
}
PROMOTE_ARGS = ["--metrics", "metrics", "--models", "models", "--out", "reports"]
promote_stage = importlib.import_module("mnistgen.stages.promote")


@pytest.fixture(params=["sqlite", pytest.param("team", marks=[pytest.mark.team, pytest.mark.slow])])
def workspace(request, tmp_path, monkeypatch) -> Path:
    """This test's own folder (the working directory) with its own empty store: an embedded SQLite file, or
    the team server (PostgreSQL + Swift + mlflow server, started once per session) with its registry emptied
    and the `ci` account."""
    monkeypatch.chdir(tmp_path)
    if request.param == "sqlite":
        shutil.copy(request.getfixturevalue("empty_store"), tmp_path / "mlflow.db")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    else:
        settings = request.getfixturevalue("team_stack")
        clear_registry(settings)
        use_team_account(monkeypatch, settings, "ci")
    return tmp_path


def use_models(*names: str) -> None:
    """params.yaml whose `models` and `gate` hold only these models: promote registers just them."""
    write_params(Path.cwd(), models={n: tiny_model_params(n) for n in names}, gate={n: GATE[n] for n in names})


def candidate(name: str, **changes) -> str:
    """Log a tiny model as a new training run and write its metrics, as train + evaluate would; returns the run id."""
    folder = Path("models") / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(build_model(tiny(name)).state_dict(), folder / "weights.pt")
    (folder / "config.json").write_text(json.dumps(tiny_model_params(name)))
    with tracking.Run.start(
        "registry-test", name, {"git_commit": "abc", "params_hash": "p", "device": "cpu", "torch_version": "t"}
    ) as run:
        uri = run.log_generator(folder / "weights.pt", folder / "config.json", 4, np.zeros((1, 4), dtype=np.float32))
    tracking.write_run_file(folder / "run.json", run, uri)
    write_json(f"metrics/{name}.json", {**GOOD[name], **changes, "evaluator_hash": "e" * 64})
    return run.run_id


def promote_now() -> tuple[int, dict]:
    code = promote_stage.main(PROMOTE_ARGS)
    return code, json.loads(Path("reports/promotion.json").read_text())


def snapshot() -> dict:
    """The whole registry: every registered model's live versions and its aliases."""
    client = tracking.client()
    return {
        m.name: {
            "versions": sorted(int(v.version) for v in client.search_model_versions(f"name = '{m.name}'")),
            "aliases": {k: str(v) for k, v in m.aliases.items()},
        }
        for m in client.search_registered_models()
    }


def aliases(name: str) -> dict[str, str]:
    return snapshot()[registered_name(name)]["aliases"]


def champion_of(*names: str) -> dict:
    """Promote one good candidate of each model into an empty registry; returns the snapshot."""
    use_models(*names)
    for name in names:
        candidate(name)
    code, _ = promote_now()
    assert code == 0
    return snapshot()


def test_gate_rules_without_a_registry():
    rule = GateParams(
        primary="fid_cls",
        higher_is_better=False,
        min_improvement=1.0,
        tolerance=0.5,
        agree_in_both_spaces=False,
        floors=(Floor(metric="fid_cls", max=50.0),),
    )
    assert gate.decide("m", {"fid_cls": 40.0}, None, rule).decision == gate.PROMOTE
    assert gate.decide("m", {"fid_cls": 38.6}, {"fid_cls": 40.0}, rule).decision == gate.KEEP  # 1.4 < 1.5
    assert gate.decide("m", {"fid_cls": 38.0}, {"fid_cls": 40.0}, rule).decision == gate.PROMOTE
    assert gate.decide("m", {"fid_cls": 60.0}, None, rule).decision == gate.REJECT
    assert gate.decide("m", {}, None, rule).decision == gate.REJECT  # a missing floor metric is a breach


def _banded(fid, half, fid_e2=None, half_e2=None):
    out = {"fid_cls": fid, "fid_cls_lo": fid - half, "fid_cls_hi": fid + half}
    if fid_e2 is not None:
        out.update({"fid_cls_e2": fid_e2, "fid_cls_e2_lo": fid_e2 - half_e2, "fid_cls_e2_hi": fid_e2 + half_e2})
    return out


def test_gate_tolerance_from_the_bands():
    """tolerance: band: the candidate must win by more than the two bands' facing half-widths (min_improvement 0: no overlap)."""
    rule = GateParams(
        primary="fid_cls",
        higher_is_better=False,
        min_improvement=0.0,
        tolerance="band",
        agree_in_both_spaces=False,
        floors=(Floor(metric="fid_cls", max=50.0),),
    )
    champion = _banded(20.0, 0.3)
    assert gate.decide("m", _banded(19.5, 0.3), champion, rule).decision == gate.KEEP  # 0.5 < 0.3 + 0.3: bands overlap
    promoted = gate.decide("m", _banded(19.3, 0.3), champion, rule)
    assert promoted.decision == gate.PROMOTE and "the facing band half-widths" in promoted.reason  # 0.7 > 0.6
    assert gate.decide("m", _banded(19.3, 0.1), _banded(20.0, 0.8), rule).decision == gate.KEEP  # a wide champion band: 0.7 < 0.9
    asymmetric = {"fid_cls": 19.0, "fid_cls_lo": 18.9, "fid_cls_hi": 19.9}  # only the half facing the champion counts
    assert gate.decide("m", asymmetric, champion, rule).decision == gate.KEEP  # 1.0 < 0.9 + 0.3
    old_champion = gate.decide("m", _banded(19.3, 0.3), {"fid_cls": 20.0}, rule)  # registered before bands existed
    assert old_champion.decision == gate.PROMOTE and "the champion has no band" in old_champion.reason
    with pytest.raises(KeyError, match="no band"):
        gate.decide("m", {"fid_cls": 10.0}, champion, rule)
    higher = GateParams(
        primary="nll", higher_is_better=True, min_improvement=0.0, tolerance="band", agree_in_both_spaces=False, floors=()
    )
    assert (
        gate.decide("m", {"nll": 5.0, "nll_stderr": 0.1}, {"nll": 4.5, "nll_stderr": 0.1}, higher).decision == gate.PROMOTE
    )  # 0.5 > 0.39
    assert (
        gate.decide("m", {"nll": 5.0, "nll_stderr": 0.2}, {"nll": 4.5, "nll_stderr": 0.2}, higher).decision == gate.KEEP
    )  # 0.5 < 0.78


def test_gate_decision_says_whether_it_holds_in_both_spaces():
    rule = GateParams(
        primary="fid_cls", higher_is_better=False, min_improvement=0.0, tolerance="band", agree_in_both_spaces=True, floors=()
    )
    champion = _banded(20.0, 0.3, 10.0, 0.3)
    both = gate.decide("m", _banded(18.0, 0.3, 8.0, 0.3), champion, rule)
    assert both.decision == gate.PROMOTE and "holds in both feature spaces" in both.reason
    flips = gate.decide("m", _banded(18.0, 0.3, 11.0, 0.3), champion, rule)  # better in space 1, worse in space 2
    assert (
        flips.decision == gate.KEEP
        and "does not hold in both feature spaces" in flips.reason
        and "fid_cls_e2 better by -1" in flips.reason
    )
    one_space = gate.decide("m", _banded(18.0, 0.3, 8.0, 0.3), _banded(20.0, 0.3), rule)
    assert one_space.decision == gate.PROMOTE and "decided in one feature space" in one_space.reason
    md = gate.to_markdown([flips], 0)
    assert "| fid_cls_e2 | 11 |" in md


def test_first_candidates_passing_floors_become_champions(workspace):
    models = list(GOOD)
    use_models(*models)
    run_ids = {name: candidate(name) for name in models}
    code, report = promote_now()
    assert code == 0
    assert {m: report["models"][m]["decision"] for m in models} == dict.fromkeys(models, gate.PROMOTE)
    for name in models:
        version = report["models"][name]["candidate_version"]
        assert aliases(name) == {"champion": version, "challenger": version}
        registered = tracking.client().get_model_version(registered_name(name), version)
        assert registered.run_id == run_ids[name]
    vae = tracking.client().get_model_version("mnist-vae", report["models"]["vae"]["candidate_version"])
    assert vae.tags["metric.iwae_nll"] == "100.0" and vae.tags["evaluator_hash"] == "e" * 64
    for key in ("git_commit", "data_hash", "params_hash"):
        assert key in vae.tags
    assert "no champion yet" in (workspace / "reports" / "promotion.md").read_text()


def test_promote_twice_for_the_same_runs_registers_nothing_new(workspace):
    before = champion_of("vae")
    code, report = promote_now()
    assert code == 0 and report["models"]["vae"]["decision"] == gate.KEEP  # not better than itself
    assert snapshot() == before


def test_worse_candidate_leaves_champion(workspace):
    champion = champion_of("gan")["mnist-gan"]["aliases"]["champion"]
    candidate("gan", fid_cls=15.0)  # worse than 10.0
    code, report = promote_now()
    assert code == 0 and report["models"]["gan"]["decision"] == gate.KEEP
    challenger = report["models"]["gan"]["candidate_version"]
    assert challenger != champion and aliases("gan") == {"champion": champion, "challenger": challenger}


def test_better_candidate_takes_the_title(workspace):
    champion = champion_of("gan")["mnist-gan"]["aliases"]["champion"]
    candidate("gan", fid_cls=5.0)
    code, report = promote_now()
    assert code == 0 and report["models"]["gan"]["decision"] == gate.PROMOTE
    new = report["models"]["gan"]["candidate_version"]
    assert new != champion and aliases("gan") == {"champion": new, "challenger": new}
    assert report["models"]["gan"]["champion_version"] == champion
    assert "better by 5" in (workspace / "reports" / "promotion.md").read_text()


def test_candidate_under_a_floor_exits_1_and_moves_nothing(workspace):
    """Through the real script in its own process: exit status 1 is what CI sees."""
    before = champion_of("wgan")
    candidate("wgan", fid_cls=500.0, classes_present=3)
    result = subprocess.run(
        [sys.executable, "-m", "mnistgen.stages.promote", *PROMOTE_ARGS],
        cwd=workspace,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    report = json.loads((workspace / "reports" / "promotion.json").read_text())
    assert report["models"]["wgan"]["decision"] == gate.REJECT
    assert snapshot() == before
    assert "REGRESSION" in (workspace / "reports" / "promotion.md").read_text()


def test_unreachable_registry_exits_2_and_changes_nothing(workspace, monkeypatch):
    before = champion_of("vae")
    candidate("vae", fid_cls=5.0)  # would be promoted
    store = os.environ["MLFLOW_TRACKING_URI"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////nonexistent/registry.db")
    code, report = promote_now()
    assert code == 2 and report["exit_code"] == 2
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert snapshot() == before


def test_failure_after_a_version_and_an_alias_rolls_them_back(workspace, monkeypatch, capsys):
    """The last alias move fails after new versions, a new registered model and moved aliases exist:
    every one of them is undone (aliases back to their old versions, new versions and models deleted)."""
    before = champion_of("vae")
    use_models("vae", "gan")
    candidate("vae", fid_cls=5.0)  # better: moves @challenger and @champion of mnist-vae
    candidate("gan")  # first gan: creates mnist-gan, its version 1 and @challenger
    real_set_alias, moved = Registry.set_alias, []

    def failing_set_alias(self, name, alias, version):
        if (name, alias) == ("mnist-gan", "champion"):
            raise MlflowException("injected: the store failed moving the alias")
        real_set_alias(self, name, alias, version)
        moved.append((name, alias, version))

    monkeypatch.setattr(Registry, "set_alias", failing_set_alias)
    code, report = promote_now()
    assert code == 2 and report["exit_code"] == 2
    assert [(n, a) for n, a, _ in moved] == [("mnist-vae", "challenger"), ("mnist-vae", "champion"), ("mnist-gan", "challenger")]
    assert int(moved[0][2]) not in before["mnist-vae"]["versions"]  # a new vae version was created...
    assert snapshot() == before  # ...and is gone again, as are mnist-gan and every alias move
    assert "registry left as it was" in capsys.readouterr().err


def test_store_failing_midway_leaves_the_registry_exactly_as_it_was(workspace, monkeypatch):
    """The store itself starts refusing new versions after the first one of this promotion."""
    before = champion_of("vae", "gan")
    candidate("vae", fid_cls=5.0)
    candidate("gan", fid_cls=5.0)
    real_create, created = MlflowClient.create_model_version, []

    def create_then_fail(self, name, *args, **kwargs):
        if created:
            raise MlflowException("injected: database is locked")
        version = real_create(self, name, *args, **kwargs)
        created.append((name, str(version.version)))
        return version

    monkeypatch.setattr(MlflowClient, "create_model_version", create_then_fail)
    code, _ = promote_now()
    assert code == 2
    assert len(created) == 1 and int(created[0][1]) not in before[created[0][0]]["versions"]
    assert snapshot() == before


def test_pyfunc_by_alias_returns_images(workspace):
    import mlflow

    champion_of("vae")
    model = mlflow.pyfunc.load_model("models:/mnist-vae@champion")
    images = model.predict(np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32))
    assert images.shape == (6, 28, 28) and images.min() >= 0 and images.max() <= 1
    assert model.predict(np.zeros((1, 4), np.float32), params={"count": 3}).shape == (3, 28, 28)


def test_a_registered_version_names_every_package_its_code_imports_and_predicts(workspace):
    """The logged environment (requirements.txt) covers every third-party import of the code shipped with the
    version, read from the downloaded artifact itself; mlflow.models.predict then draws samples from it."""
    import mlflow
    from packaging.requirements import Requirement

    champion_of("vae")
    uri = "models:/mnist-vae@champion"
    folder = Path(mlflow.artifacts.download_artifacts(uri))
    required = {Requirement(line).name.lower() for line in (folder / "requirements.txt").read_text().split() if line}
    imports = tracking.imported_packages([*folder.rglob("*.py")])
    providers = importlib.metadata.packages_distributions()
    assert {"torch", "numpy", "pydantic", "yaml", "mlflow"} <= imports
    for name in imports:
        assert {d.lower() for d in providers[name]} & required, f"{name} is imported by the model's code but not required"
    out = folder.parent / "predicted.json"
    mlflow.models.predict(uri, input_data=np.zeros((2, 4), np.float32), env_manager="local", output_path=str(out))
    assert np.asarray(json.loads(out.read_text())["predictions"]).shape == (2, 28, 28)


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_digits_and_survives_garbage(workspace):
    champion_of("wgan")
    with served_model("models:/mnist-wgan@champion") as port:
        status, body = post_invocation(port, {"inputs": np.zeros((2, 4)).tolist()})
        assert status == 200, body
        images = np.asarray(json.loads(body)["predictions"])
        assert images.shape == (2, 28, 28) and images.min() >= 0 and images.max() <= 1
        status, body = post_invocation(port, {"inputs": [[0.0] * 4], "params": {"count": 3}})
        assert status == 200 and np.asarray(json.loads(body)["predictions"]).shape == (3, 28, 28)
        for garbage in (b"\x00\xffnot json", b'{"inputs": [[1, 2, 3]]}', b'{"inputs": "hello"}', b'{"nothing": 1}'):
            status, _ = post_invocation(port, garbage)
            assert 400 <= status < 500, (garbage, status)
        status, _ = post_invocation(port, {"inputs": [[0.5] * 4]})
        assert status == 200  # still up after the garbage
