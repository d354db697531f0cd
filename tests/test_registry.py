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
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import clear_registry, use_team_account
from helpers import (
    enter_world,
    post_invocation,
    served_model,
    tiny,
    tiny_evaluation_sections,
    tiny_model_params,
    write_params,
)
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mnistgen import data, evaluation, gate, tracking, training
from mnistgen.card import cell
from mnistgen.config import EvaluateParams, Floor, GateParams, load_section
from mnistgen.models import build_model
from mnistgen.registry import Registry, champion_at, registered_name
from mnistgen.utils import write_json

GATE = {  # the tests' own gate, independent of the repo's floors
    name: {
        "primary": "fid_cls",
        "higher_is_better": False,
        "agree_in_both_spaces": True,
        "training_noise": {"fid_cls": 0.05, "fid_cls_e2": 0.05},  # tiny models on synthetic digits: seeds differ by ~0.03
        "floors": [{"metric": "fid_cls", "max": 1e6}],
    }
    for name in ("ae", "vae", "gan", "wgan")
}
PROMOTE_ARGS = [
    *("--metrics", "metrics/val", "--models", "models", "--evaluation", "evaluation"),
    *("--evaluator", "models/evaluator", "--data", "data/prepared", "--out", "reports"),
]
promote_stage = importlib.import_module("mnistgen.stages.promote")


@pytest.fixture(params=["sqlite", pytest.param("team", marks=[pytest.mark.team, pytest.mark.slow])])
def workspace(request, world, tmp_path, monkeypatch) -> Path:
    """This test's own folder (the working directory) with the world's data and evaluators and its own empty store: an
    embedded SQLite file, or the team server (PostgreSQL + Swift + mlflow server, started once per session) with its
    registry emptied and the `ci` account."""
    enter_world(world, tmp_path)
    monkeypatch.chdir(tmp_path)
    if request.param == "sqlite":
        shutil.copy(request.getfixturevalue("empty_store"), tmp_path / "mlflow.db")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    else:
        settings = request.getfixturevalue("team_stack")
        clear_registry(settings)
        use_team_account(monkeypatch, settings, "ci")
    return tmp_path


def use_models(*names: str, evaluate: dict | None = None, **gate_changes) -> None:
    """params.yaml whose `models` and `gate` hold only these models: promote registers just them."""
    write_params(
        Path.cwd(),
        models={n: tiny_model_params(n) for n in names},
        gate={n: {**GATE[n], **gate_changes} for n in names},
        **{**tiny_evaluation_sections(), **({"evaluate": evaluate} if evaluate else {})},
    )


def trained(name: str, epochs: int, seed: int = 0):
    """A tiny model of `name` after `epochs` epochs on the synthetic digits (0: its random initial weights)."""
    torch.manual_seed(seed)
    model = build_model(tiny(name, epochs=max(epochs, 1)))
    if epochs:
        train, val = data.load_split("data/prepared", "train"), data.load_split("data/prepared", "val")
        training.train(model, data.to_float(train.images), data.to_float(val.images), seed=seed, progress=False)
    return model.eval()


def candidate(name: str, epochs: int = 0, seed: int = 0, grade: str = "default", **overrides) -> str:
    """What train + evaluate leave behind for a tiny model (a logged run, its folder, its validation metrics and evidence,
    the evidence logged into the run); returns the run id. `overrides` replace measured metrics (for floor tests)."""
    folder = Path("models") / name
    folder.mkdir(parents=True, exist_ok=True)
    model = trained(name, epochs, seed)
    torch.save(model.state_dict(), folder / "weights.pt")
    (folder / "config.json").write_text(json.dumps(tiny_model_params(name, epochs=max(epochs, 1))))
    tags = {"git_commit": "abc", "params_hash": "p", "device": "cpu", "torch_version": "t", "grade": grade, "family": name}
    with tracking.Run.start("registry-test", name, tags) as run:
        uri = run.log_generator(folder / "weights.pt", folder / "config.json", 4, np.zeros((1, 4), dtype=np.float32))
        params = load_section(EvaluateParams, "evaluate")
        results, evidence = evaluation.measure(
            model, Path("models/evaluator"), Path("data/prepared"), params, torch.device("cpu")
        )
        figures = Path("evaluation") / name
        figures.mkdir(parents=True, exist_ok=True)
        torch.save(evidence, figures / evaluation.EVIDENCE)
        run.log_artifacts(figures, "evaluation")
    tracking.write_run_file(folder / "run.json", run, uri)
    for split, measured in results.items():
        write_json(f"metrics/{split}/{name}.json", {**measured, **overrides})
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


def champion_of(*names: str, epochs: int = 0) -> dict:
    """Promote one candidate of each model into an empty registry; returns the snapshot."""
    use_models(*names)
    for name in names:
        candidate(name, epochs)
    code, _ = promote_now()
    assert code == 0
    return snapshot()


RULE = GateParams(
    primary="fid_cls",
    higher_is_better=False,
    agree_in_both_spaces=True,
    training_noise={"fid_cls": 1.0, "fid_cls_e2": 2.0},
    floors=(Floor(metric="fid_cls", max=50.0),),
)


def compared(gain: float, half: float, gain_e2: float, half_e2: float) -> list[gate.Comparison]:
    """Paired comparisons where the candidate's FID is lower by `gain` (+- half) in space 1 and `gain_e2` in space 2."""
    return [
        gate.Comparison("fid_cls", -gain, -gain - half, -gain + half),
        gate.Comparison("fid_cls_e2", -gain_e2, -gain_e2 - half_e2, -gain_e2 + half_e2),
    ]


def test_the_gate_promotes_only_beyond_training_noise_in_both_spaces():
    champion = {"fid_cls": 20.0}
    decide = lambda comparisons: gate.decide("m", {"fid_cls": 18.0}, champion, RULE, comparisons)  # noqa: E731
    assert decide(compared(1.5, 0.3, 3.0, 0.5)).decision == gate.PROMOTE  # 1.2 > 1.0 and 2.5 > 2.0
    straddles = decide(compared(1.1, 0.3, 3.0, 0.5))  # 0.8..1.4 straddles the noise 1.0
    assert straddles.decision == gate.INCONCLUSIVE and "straddles" in straddles.reason
    assert decide(compared(0.5, 0.3, 3.0, 0.5)).decision == gate.KEEP  # 0.2..0.8 <= 1.0: not better beyond the noise
    worse = decide(compared(-3.0, 0.3, -3.0, 0.3))
    assert worse.decision == gate.KEEP and "worse beyond the noise" in worse.reason
    flips = decide(compared(1.5, 0.3, -3.0, 0.3))  # better in space 1, worse in space 2: the champion stays
    assert flips.decision == gate.KEEP and "fid_cls_e2: better by -3" in flips.reason
    assert gate.decide("m", {"fid_cls": 60.0}, None, RULE).decision == gate.REJECT
    assert gate.decide("m", {}, None, RULE).decision == gate.REJECT  # a missing floor metric is a breach
    assert gate.decide("m", {"fid_cls": 40.0}, None, RULE).decision == gate.PROMOTE
    with pytest.raises(ValueError, match="paired comparison"):
        gate.decide("m", {"fid_cls": 10.0}, champion, RULE)  # a champion and no comparison: never guessed
    with pytest.raises(ValueError, match="training_noise needs a value for fid_cls_e2"):
        GateParams(
            primary="fid_cls", higher_is_better=False, agree_in_both_spaces=True, training_noise={"fid_cls": 1.0}, floors=()
        )


def test_grades_rank_and_a_smoke_run_never_becomes_a_team_champion():
    better = compared(5.0, 0.1, 5.0, 0.1)
    below = gate.decide("m", {"fid_cls": 10.0}, {"fid_cls": 20.0}, RULE, better, "smoke", "default")
    assert below.decision == gate.KEEP and "grade smoke is below the champion's default" in below.reason
    assert gate.decide("m", {"fid_cls": 10.0}, {"fid_cls": 20.0}, RULE, better, "sweep", "default").decision == gate.KEEP
    assert gate.decide("m", {"fid_cls": 10.0}, {"fid_cls": 20.0}, RULE, better, "paper", "default").decision == gate.PROMOTE
    assert gate.decide("m", {"fid_cls": 10.0}, {"fid_cls": 20.0}, RULE, better, "default", "smoke").decision == gate.PROMOTE
    assert gate.decide("m", {"fid_cls": 10.0}, None, RULE, candidate_grade="smoke").decision == gate.PROMOTE  # local: allowed
    team = gate.decide("m", {"fid_cls": 10.0}, None, RULE, candidate_grade="smoke", team=True)
    assert team.decision == gate.KEEP and "never becomes a team champion" in team.reason


def test_first_candidates_passing_floors_become_champions_with_a_card_and_a_ledger_entry(workspace):
    models = ["vae", "gan"]
    use_models(*models)
    run_ids = {name: candidate(name) for name in models}
    code, report = promote_now()
    assert code == 0
    assert {m: report["models"][m]["decision"] for m in models} == dict.fromkeys(models, gate.PROMOTE)
    client = tracking.client()
    for name in models:
        version = report["models"][name]["candidate_version"]
        assert aliases(name) == {"champion": version, "challenger": version}
        registered = client.get_model_version(registered_name(name), version)
        assert registered.run_id == run_ids[name]
        measured = json.loads(Path(f"metrics/val/{name}.json").read_text())
        assert registered.tags["protocol"] == measured["protocol"] == report["models"][name]["candidate_protocol"]
        assert json.loads(registered.tags["protocol_json"])["split"] == "val" and registered.tags["grade"] == "default"
        for key in ("git_commit", "data_hash", "params_hash", "evaluator_hash", "evaluator_hash_e2"):
            assert key in registered.tags
        assert f"# mnist-{name} v{version}" in registered.description and measured["protocol"] in registered.description
        [entry] = Registry().history(registered_name(name))
        assert (entry["from"], entry["to"], entry["action"]) == (None, version, "promote") and "no champion yet" in entry[
            "evidence"
        ]
    assert "no champion yet" in (workspace / "reports" / "promotion.md").read_text()


def test_promote_twice_for_the_same_runs_registers_nothing_new(workspace):
    before = champion_of("vae")
    code, report = promote_now()
    assert code == 0 and report["models"]["vae"]["decision"] == gate.KEEP  # not better than itself
    assert report["models"]["vae"]["comparisons"][0]["difference"] == 0.0  # the same evidence, compared with itself
    assert snapshot() == before


def test_worse_candidate_leaves_champion(workspace):
    champion = champion_of("vae", epochs=3)["mnist-vae"]["aliases"]["champion"]
    candidate("vae", epochs=0)  # random weights: worse
    code, report = promote_now()
    assert code == 0 and report["models"]["vae"]["decision"] == gate.KEEP
    assert "worse beyond the noise" in report["models"]["vae"]["reason"]
    challenger = report["models"]["vae"]["candidate_version"]
    assert challenger != champion and aliases("vae") == {"champion": champion, "challenger": challenger}


def test_better_candidate_takes_the_title(workspace):
    champion = champion_of("vae")["mnist-vae"]["aliases"]["champion"]
    candidate("vae", epochs=3)
    code, report = promote_now()
    assert code == 0 and report["models"]["vae"]["decision"] == gate.PROMOTE
    new = report["models"]["vae"]["candidate_version"]
    assert new != champion and aliases("vae") == {"champion": new, "challenger": new}
    assert report["models"]["vae"]["champion_version"] == champion and not report["models"]["vae"]["remeasured"]
    assert "better beyond the noise" in (workspace / "reports" / "promotion.md").read_text()


def test_a_rerun_with_another_seed_is_neither_promoted_nor_rejected(workspace):
    """The same params, another training seed: the difference is training noise, which the gate's margin covers."""
    champion = champion_of("vae", epochs=3)["mnist-vae"]["aliases"]["champion"]
    candidate("vae", epochs=3, seed=1)
    code, report = promote_now()
    decided = report["models"]["vae"]
    assert code == 0 and decided["decision"] in (gate.KEEP, gate.INCONCLUSIVE) and "worse beyond" not in decided["reason"]
    assert aliases("vae")["champion"] == champion
    assert all(abs(c["difference"]) < GATE["vae"]["training_noise"][c["metric"]] for c in decided["comparisons"])


def test_a_champion_measured_under_another_protocol_is_remeasured_under_the_candidates(workspace):
    champion = champion_of("vae")["mnist-vae"]["aliases"]["champion"]
    old = tracking.client().get_model_version("mnist-vae", champion).tags["protocol"]
    use_models("vae", evaluate={**tiny_evaluation_sections()["evaluate"], "num_samples": 300})  # another protocol
    candidate("vae", epochs=3)
    shutil.rmtree("metrics/test")  # the gate chooses: without the test split at all, it decides the same
    Path("data/prepared/test.pt").unlink()
    code, report = promote_now()
    decided = report["models"]["vae"]
    assert code == 0 and decided["remeasured"] and decided["decision"] == gate.PROMOTE
    assert decided["champion_protocol"] == old != decided["candidate_protocol"]
    assert f"champion `{old}`" in (workspace / "reports" / "promotion.md").read_text()
    # the champion's numbers in the decision are its own under the new protocol, measured by the evaluate stage's code
    remeasured, _ = evaluation.measure(  # on validation only: the test split is gone
        trained("vae", 0),
        Path("models/evaluator"),
        Path("data/prepared"),
        load_section(EvaluateParams, "evaluate"),
        torch.device("cpu"),
        splits=("val",),
    )
    assert decided["champion"]["fid_cls"] == pytest.approx(remeasured["val"]["fid_cls"], rel=1e-6)


def test_a_champion_that_cannot_be_remeasured_makes_promotion_refuse(workspace, capsys):
    if tracking.is_team_server():
        pytest.skip("the champion's weights are removed from the embedded store's files; the team's live in Swift")
    before = champion_of("vae")
    for weights in Path("mlartifacts").rglob("weights.pt"):  # the champion's logged model loses its weights
        weights.unlink()
    use_models("vae", evaluate={**tiny_evaluation_sections()["evaluate"], "num_samples": 300})
    candidate("vae", epochs=3)
    for weights in Path("mlartifacts").rglob("weights.pt"):
        assert weights.exists()  # only the old ones are gone
    code, report = promote_now()
    assert code == 2 and report["exit_code"] == 2
    assert "cannot be re-measured" in capsys.readouterr().err
    assert snapshot() == before


def test_a_smoke_candidate_cannot_displace_a_default_champion(workspace):
    champion = champion_of("vae")["mnist-vae"]["aliases"]["champion"]
    candidate("vae", epochs=3, grade="smoke")  # better, but a smoke run
    code, report = promote_now()
    assert code == 0 and report["models"]["vae"]["decision"] == gate.KEEP
    reason = report["models"]["vae"]["reason"]  # on a team server the stricter rule speaks first
    assert "grade smoke is below the champion's default" in reason or "never becomes a team champion" in reason
    assert aliases("vae")["champion"] == champion


def test_a_smoke_run_becomes_no_team_champion(workspace):
    use_models("vae")
    candidate("vae", grade="smoke")
    code, report = promote_now()
    team = tracking.is_team_server()
    assert code == 0 and report["models"]["vae"]["decision"] == (gate.KEEP if team else gate.PROMOTE)
    assert ("champion" in aliases("vae")) != team


def test_the_ledger_answers_who_was_champion_when_after_three_promotions_and_a_rollback(workspace, capsys):
    from mnistgen import registry as registry_module

    use_models("vae", training_noise={"fid_cls": 0.0, "fid_cls_e2": 0.0})
    moments = []
    for epochs in (0, 3, 8):  # each better than the last
        candidate("vae", epochs=epochs)
        code, report = promote_now()
        assert code == 0 and report["models"]["vae"]["decision"] == gate.PROMOTE, report["models"]["vae"]["reason"]
        moments.append((time.time(), report["models"]["vae"]["candidate_version"]))
        time.sleep(1.1)
    assert registry_module.main(["rollback", "mnist-vae", "--to", moments[0][1]]) == 0
    assert aliases("vae")["champion"] == moments[0][1]
    history = Registry().history("mnist-vae")
    assert [(r["action"], r["from"], r["to"]) for r in history] == [
        ("promote", None, moments[0][1]),
        ("promote", moments[0][1], moments[1][1]),
        ("promote", moments[1][1], moments[2][1]),
        ("rollback", moments[2][1], moments[0][1]),
    ]
    for when, version in moments:
        assert champion_at(history, when) == version
    assert champion_at(history, history[0]["at_epoch"] - 1) is None and champion_at(history, time.time()) == moments[0][1]
    capsys.readouterr()
    at = datetime.fromtimestamp(moments[1][0], UTC).isoformat()
    assert registry_module.main(["history", "mnist-vae", "--at", at]) == 0
    assert capsys.readouterr().out.strip() == f"mnist-vae@champion at {at}: v{moments[1][1]}"
    assert registry_module.main(["rollback", "mnist-vae", "--to", "99"]) == 2  # no such version: nothing moves
    assert len(Registry().history("mnist-vae")) == 4 and aliases("vae")["champion"] == moments[0][1]


def test_the_card_and_the_ledger_quote_the_metrics_they_come_from(workspace):
    champion_of("vae")
    candidate("vae", epochs=3)
    code, report = promote_now()
    decided = report["models"]["vae"]
    version = tracking.client().get_model_version("mnist-vae", decided["candidate_version"])
    measured = json.loads(Path("metrics/val/vae.json").read_text())
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in version.description.splitlines()
        if line.startswith("| ")
    }
    for key in ("fid_cls", "fid_cls_e2", "iwae_nll", "recon_mse"):
        assert rows[key] == cell(measured, key)  # the card's figure is the measured one, band and all
        assert float(version.tags[f"metric.{key}"]) == measured[key]
    assert f"**{decided['decision']}**: {decided['reason']}" in version.description
    last = Registry().history("mnist-vae")[-1]
    assert last["to"] == decided["candidate_version"] and last["evidence"].startswith(decided["reason"])
    for c in decided["comparisons"]:  # the evidence quotes the paired comparison's own numbers
        assert f"better by {-c['difference']:.4g} [{-c['hi']:.4g}, {-c['lo']:.4g}]" in last["evidence"]
    assert (
        tracking.client().download_artifacts(version.run_id, "model_card.md")
        and version.description in Path(tracking.client().download_artifacts(version.run_id, "model_card.md")).read_text()
    )


def test_candidate_under_a_floor_exits_1_and_moves_nothing(workspace):
    """Through the real script in its own process: exit status 1 is what CI sees."""
    before = champion_of("wgan")
    candidate("wgan", fid_cls=2e6)
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
    candidate("vae", epochs=3)  # would be promoted
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
    candidate("vae", epochs=3)  # better: moves @challenger and @champion of mnist-vae
    candidate("gan")  # first gan: creates mnist-gan, its version 1 and @challenger
    real_set_alias, moved = Registry.set_alias, []

    def failing_set_alias(self, name, alias, version):
        if (name, alias) == ("mnist-gan", "champion"):
            raise MlflowException("injected: the store failed moving the alias")
        moved.append((name, alias, version))
        return real_set_alias(self, name, alias, version)

    monkeypatch.setattr(Registry, "set_alias", failing_set_alias)
    code, report = promote_now()
    assert code == 2 and report["exit_code"] == 2
    assert [(n, a) for n, a, _ in moved] == [("mnist-vae", "challenger"), ("mnist-vae", "champion"), ("mnist-gan", "challenger")]
    assert int(moved[0][2]) not in before["mnist-vae"]["versions"]  # a new vae version was created...
    assert snapshot() == before  # ...and is gone again, as are mnist-gan and every alias move
    assert "registry left as it was" in capsys.readouterr().err


def test_store_failing_midway_leaves_the_registry_exactly_as_it_was(workspace, monkeypatch):
    """The store itself starts refusing new versions after the first one of this promotion."""
    before = champion_of("vae", "ae")
    candidate("vae", epochs=3)
    candidate("ae", epochs=3)
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
