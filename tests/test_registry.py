"""The promotion gate against a real SQLite registry (and the team server where the store matters: `workspace`), the
pyfunc by alias, and serving.

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
import yaml
from conftest import clear_registry, use_team_account
from helpers import (
    ROOT,
    enter_world,
    git,
    post_invocation,
    served_model,
    tiny,
    tiny_evaluation_sections,
    tiny_model_params,
    write_params,
)
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mnistgen import data, evaluation, gate, grades, logged_model, tracking, training
from mnistgen.card import cell
from mnistgen.config import EvaluateParams, GateParams, load_section
from mnistgen.models import build_model
from mnistgen.registry import ChampionMoved, Registry, champion_at, registered_name
from mnistgen.utils import write_json

GATE = {  # the tests' own gate, independent of the repo's floors
    name: {
        "primary": "fid_cls",
        "higher_is_better": False,
        "agree_in_both_spaces": True,
        "floors": [{"metric": "fid_cls", "max": 1e6}],
    }
    for name in ("ae", "vae", "gan", "wgan")
}
GATE_SETTINGS = {"alpha": 0.05, "bootstrap": 200, "bootstrap_seed": 0}
# The tests' training noise (metrics/seeds): tiny models on synthetic digits, whose seeds differ by ~0.03
NOISE = {"seeds": 3, "seed_sd": 0.03, "pair_eval_var": 0.0004}
PROMOTE_ARGS = [
    *("--metrics", "metrics/val", "--models", "models", "--evaluation", "evaluation"),
    *("--evaluator", "models/evaluator", "--data", "data/prepared", "--seeds", "metrics/seeds", "--out", "reports"),
]
promote_stage = importlib.import_module("mnistgen.stages.promote")


def open_workspace(request, world, tmp_path: Path, monkeypatch, store: str) -> Path:
    """This test's own folder (the working directory) with the world's data and evaluators and its own empty store: an
    embedded SQLite file, or the team server (PostgreSQL + Swift + mlflow server, started once per session) with its
    registry emptied and the `ci` account."""
    enter_world(world, tmp_path)
    monkeypatch.chdir(tmp_path)
    if store == "sqlite":
        shutil.copy(request.getfixturevalue("empty_store"), tmp_path / "mlflow.db")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    else:
        settings = request.getfixturevalue("team_stack")
        clear_registry(settings)
        use_team_account(monkeypatch, settings, "ci")
    return tmp_path


@pytest.fixture(params=["sqlite", pytest.param("team", marks=[pytest.mark.team, pytest.mark.slow])])
def workspace(request, world, tmp_path, monkeypatch) -> Path:
    """For what the store itself does (its REST API and permissions, artifacts in S3, concurrent writers, the ledger's
    tags, the team's rules): each such test runs against SQLite and against the team server."""
    return open_workspace(request, world, tmp_path, monkeypatch, request.param)


@pytest.fixture
def local_workspace(request, world, tmp_path, monkeypatch) -> Path:
    """For the gate's decisions, which no store changes: SQLite only (the tests on `workspace` show the team server
    stores, loads and moves what the gate decides)."""
    return open_workspace(request, world, tmp_path, monkeypatch, "sqlite")


def use_models(
    *names: str,
    evaluate: dict | None = None,
    noise: dict | None = None,
    commit: bool = True,
    model_changes: dict | None = None,
    **gate_changes,
) -> None:
    """params.yaml whose `models` and `gate` hold only these models (promote registers just them), their training noise
    in metrics/seeds, and, with `commit`, params.yaml committed: a run of it earns the default grade."""
    write_params(
        Path.cwd(),
        models={n: tiny_model_params(n, **(model_changes or {})) for n in names},
        gate={**GATE_SETTINGS, **{n: {**GATE[n], **gate_changes} for n in names}},
        **{**tiny_evaluation_sections(), **({"evaluate": evaluate} if evaluate else {})},
    )
    params = yaml.safe_load(Path("params.yaml").read_text())
    for n in names:
        compared = gate.compared_metrics(load_section(GateParams, f"gate.{n}"))
        record = {"model": n, "noise": {m: {**NOISE, **(noise or {})} for m in compared}, "recipe": grades.recipe_hash(params, n)}
        write_json(f"metrics/seeds/{n}.json", record)
    if commit:
        if not Path(".git").exists():
            git("init", "-q", cwd=Path.cwd())
        shutil.copy(ROOT / "params-paper.yaml", "params-paper.yaml")
        git("add", "params.yaml", "params-paper.yaml", cwd=Path.cwd())
        git("commit", "-qm", "params", "--allow-empty", cwd=Path.cwd())


def trained(name: str, epochs: int, seed: int = 0):
    """A tiny model of `name` after `epochs` epochs on the synthetic digits (0: its random initial weights)."""
    torch.manual_seed(seed)
    model = build_model(tiny(name, epochs=max(epochs, 1)))
    if epochs:
        train, val = data.load_split("data/prepared", "train"), data.load_split("data/prepared", "val")
        training.train(model, data.to_float(train.images), data.to_float(val.images), seed=seed, progress=False)
    return model.eval()


def candidate(name: str, epochs: int = 0, seed: int = 0, grade: str = "default", selected_from: int = 1, **overrides) -> str:
    """What train + evaluate leave behind for a tiny model (a logged run, its folder, its validation metrics and evidence,
    the evidence logged into the run); returns the run id. `overrides` replace measured metrics (for floor tests)."""
    folder = Path("models") / name
    folder.mkdir(parents=True, exist_ok=True)
    model = trained(name, epochs, seed)
    torch.save(model.state_dict(), folder / "weights.pt")
    (folder / "config.json").write_text(json.dumps(tiny_model_params(name, epochs=max(epochs, 1))))
    recipe = grades.recipe_hash(yaml.safe_load(Path("params.yaml").read_text()), name)
    tags = {
        **{"git_commit": "abc", "params_hash": "p", "device": "cpu", "torch_version": "t", "grade": grade, "family": name},
        **{"model": name, "stage": "train", "recipe": recipe, "selected_from": str(selected_from)},
    }
    with tracking.Run.start("registry-test", name, tags) as run:
        uri = run.log_generator(folder / "weights.pt", folder / "config.json", 4, np.zeros((1, 4), dtype=np.float32))
        params = load_section(EvaluateParams, "evaluate")
        with data.reading_test("evaluate"):  # as the evaluate stage measures: both splits
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


@pytest.mark.slow  # several promotions, or processes: the slow tier
def test_promote_twice_for_the_same_runs_registers_nothing_new(workspace):
    before = champion_of("vae")
    code, report = promote_now()
    assert code == 0 and report["models"]["vae"]["decision"] == gate.INCONCLUSIVE  # not better than itself
    assert report["models"]["vae"]["verdicts"][0]["improvement"] == 0.0  # the same evidence, compared with itself
    assert snapshot() == before


def test_worse_candidate_leaves_champion(local_workspace):
    champion = champion_of("vae", epochs=3)["mnist-vae"]["aliases"]["champion"]
    candidate("vae", epochs=0)  # random weights: worse
    code, report = promote_now()
    assert code == 0 and report["models"]["vae"]["decision"] == gate.KEEP
    assert "worse beyond the noise" in report["models"]["vae"]["reason"]
    challenger = report["models"]["vae"]["candidate_version"]
    assert challenger != champion and aliases("vae") == {"champion": champion, "challenger": challenger}


def test_better_candidate_takes_the_title(local_workspace):
    champion = champion_of("vae")["mnist-vae"]["aliases"]["champion"]
    candidate("vae", epochs=3)
    code, report = promote_now()
    assert code == 0 and report["models"]["vae"]["decision"] == gate.PROMOTE
    new = report["models"]["vae"]["candidate_version"]
    assert new != champion and aliases("vae") == {"champion": new, "challenger": new}
    assert report["models"]["vae"]["champion_version"] == champion and not report["models"]["vae"]["remeasured"]
    assert "better beyond the noise" in (local_workspace / "reports" / "promotion.md").read_text()


@pytest.mark.slow  # several promotions, or processes: the slow tier
def test_a_rerun_with_another_seed_is_neither_promoted_nor_rejected(local_workspace):
    """The same params, another training seed: the difference is training noise, which the gate's margin covers."""
    champion = champion_of("vae", epochs=3)["mnist-vae"]["aliases"]["champion"]
    candidate("vae", epochs=3, seed=1)
    code, report = promote_now()
    decided = report["models"]["vae"]
    assert code == 0 and decided["decision"] in (gate.KEEP, gate.INCONCLUSIVE) and "worse beyond" not in decided["reason"]
    assert aliases("vae")["champion"] == champion
    assert all(abs(v["improvement"]) < v["threshold"] for v in decided["verdicts"])


@pytest.mark.slow  # several promotions, or processes: the slow tier
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


@pytest.mark.slow  # several promotions, or processes: the slow tier
def test_a_champion_that_cannot_be_remeasured_makes_promotion_refuse(local_workspace, capsys):
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


def test_a_smoke_candidate_cannot_displace_a_default_champion(local_workspace):
    champion = champion_of("vae")["mnist-vae"]["aliases"]["champion"]
    candidate("vae", epochs=3, grade="smoke")  # better, but a smoke run
    code, report = promote_now()
    assert code == 0 and report["models"]["vae"]["decision"] == gate.KEEP
    assert "grade smoke is below the champion's default" in report["models"]["vae"]["reason"]
    assert aliases("vae")["champion"] == champion


@pytest.mark.slow  # several promotions, or processes: the slow tier
def test_a_smoke_run_becomes_no_team_champion(workspace):
    use_models("vae")
    candidate("vae", grade="smoke")
    code, report = promote_now()
    team = tracking.is_team_server()
    assert code == 0 and report["models"]["vae"]["decision"] == (gate.KEEP if team else gate.PROMOTE)
    assert ("champion" in aliases("vae")) != team


@pytest.mark.slow  # several promotions, or processes: the slow tier
def test_the_ledger_answers_who_was_champion_when_after_three_promotions_and_a_rollback(workspace, capsys, monkeypatch):
    from mnistgen import registry as registry_library
    from mnistgen.commands import registry as registry_module

    ticks = iter(range(1_800_000_000, 1_800_003_600, 60))  # a fake clock: one move a minute, nothing sleeps
    monkeypatch.setattr(registry_library, "clock", lambda: float(next(ticks)))
    use_models("vae", noise={"seed_sd": 0.0, "pair_eval_var": 0.0})  # no training noise: the evaluation noise decides
    moments = []
    for epochs in (0, 3, 8):  # each better than the last
        candidate("vae", epochs=epochs)
        code, report = promote_now()
        assert code == 0 and report["models"]["vae"]["decision"] == gate.PROMOTE, report["models"]["vae"]["reason"]
        moved_at = Registry().history("mnist-vae")[-1]["at_epoch"]
        moments.append((moved_at + 30, report["models"]["vae"]["candidate_version"]))  # half a minute after the move
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
    assert (
        champion_at(history, history[0]["at_epoch"] - 1) is None and champion_at(history, moments[-1][0] + 3600) == moments[0][1]
    )
    capsys.readouterr()
    at = datetime.fromtimestamp(moments[1][0], UTC).isoformat()
    assert registry_module.main(["history", "mnist-vae", "--at", at]) == 0
    assert capsys.readouterr().out.strip() == f"mnist-vae@champion at {at}: v{moments[1][1]}"
    assert registry_module.main(["rollback", "mnist-vae", "--to", "99"]) == 2  # no such version: nothing moves
    assert len(Registry().history("mnist-vae")) == 4 and aliases("vae")["champion"] == moments[0][1]


@pytest.mark.slow  # several promotions, or processes: the slow tier
def test_the_card_and_the_ledger_quote_the_metrics_they_come_from(local_workspace):
    champion_of("vae")
    candidate("vae", epochs=3)
    code, report = promote_now()
    decided = report["models"]["vae"]
    version = tracking.client().get_model_version("mnist-vae", decided["candidate_version"])
    measured = json.loads(Path("metrics/val/vae.json").read_text())
    headline = version.description.split("## Headline metrics")[1].split("## Gate")[0]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in headline.splitlines() if line.startswith("| ")}
    for key in ("fid_cls", "fid_cls_e2", "iwae_nll", "recon_mse"):
        assert rows[key] == cell(measured, key)  # the card's figure is the measured one, band and all
        assert float(version.tags[f"metric.{key}"]) == measured[key]
    assert f"**{decided['decision']}**: {decided['reason']}" in version.description
    last = Registry().history("mnist-vae")[-1]
    assert last["to"] == decided["candidate_version"] and last["evidence"].startswith(decided["reason"])
    for v in decided["verdicts"]:  # the evidence quotes the rule's own numbers
        lo, hi = v["interval"]
        assert f"better by {v['improvement']:.4g} [{lo:.4g}, {hi:.4g}] (threshold {v['threshold']:.3g};" in last["evidence"]
        assert f"| {v['metric']} | {v['improvement']:.4g} | {v['eval_sd']:.3g} |" in version.description
    assert (
        tracking.client().download_artifacts(version.run_id, "model_card.md")
        and version.description in Path(tracking.client().download_artifacts(version.run_id, "model_card.md")).read_text()
    )


@pytest.mark.slow  # several promotions, or processes: the slow tier
def test_candidate_under_a_floor_exits_1_and_moves_nothing(local_workspace):
    """Through the real script in its own process: exit status 1 is what CI sees."""
    before = champion_of("wgan")
    candidate("wgan", fid_cls=2e6)
    result = subprocess.run(
        [sys.executable, "-m", "mnistgen.stages.promote", *PROMOTE_ARGS],
        cwd=local_workspace,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    report = json.loads((local_workspace / "reports" / "promotion.json").read_text())
    assert report["models"]["wgan"]["decision"] == gate.REJECT
    assert snapshot() == before
    assert "REGRESSION" in (local_workspace / "reports" / "promotion.md").read_text()


@pytest.mark.slow  # several promotions, or processes: the slow tier
def test_unreachable_registry_exits_2_and_changes_nothing(workspace, monkeypatch):
    before = champion_of("vae")
    candidate("vae", epochs=3)  # would be promoted
    store = os.environ["MLFLOW_TRACKING_URI"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////nonexistent/registry.db")
    code, report = promote_now()
    assert code == 2 and report["exit_code"] == 2
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert snapshot() == before


@pytest.mark.slow  # several promotions, or processes: the slow tier
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


def test_a_winner_chosen_among_trials_is_measured_again_on_fresh_samples(local_workspace):
    """Item 3 broken on purpose: a candidate whose only advantage is the measurement it was chosen by (its evidence is
    a better model's; its weights are the champion's). Told it is one of one, the gate is fooled; told it is the best of
    10, it measures both sides again on samples no choice read, at alpha / 10, and the advantage is gone."""
    use_models("vae")
    candidate("vae", epochs=0)
    assert promote_now()[0] == 0  # the champion: random weights
    candidate("vae", epochs=8)
    better, better_evidence = Path("metrics/val/vae.json").read_text(), Path("evaluation/vae/evidence.pt").read_bytes()
    for told in (1, 10):
        candidate("vae", epochs=0, selected_from=told)  # the champion's recipe and seed: the same weights
        Path("metrics/val/vae.json").write_text(better)  # ...shown with the better model's measurement
        Path("evaluation/vae/evidence.pt").write_bytes(better_evidence)
        code = promote_stage.main([*PROMOTE_ARGS, "--dry-run"])
        decided = json.loads(Path("reports/promotion.json").read_text())["models"]["vae"]
        assert code == 0 and decided["trials"] == told
        if told == 1:
            assert decided["decision"] == gate.PROMOTE and not decided["remeasured"]
        else:
            assert decided["decision"] != gate.PROMOTE, decided["reason"]
            assert "re-measured on fresh samples" in decided["remeasured"] and "chosen among 10 trials" in decided["remeasured"]
            assert all(v["level"] == pytest.approx(0.005) for v in decided["verdicts"])
            assert all(abs(v["improvement"]) < 1e-6 for v in decided["verdicts"])  # the same weights, the same fresh draws


def test_a_candidate_measured_under_another_protocol_than_todays_is_refused(local_workspace, capsys):
    """Item 4 broken on purpose: the evaluate params change after the candidate was measured."""
    champion_of("vae")
    candidate("vae", epochs=3)
    before = snapshot()
    use_models("vae", evaluate={**tiny_evaluation_sections()["evaluate"], "seed": 7})  # not the protocol it was measured under
    code, report = promote_now()
    decided = report["models"]["vae"]
    assert code == 2 and decided["decision"] == gate.ERROR and "not today's" in decided["reason"]
    assert "error: vae: " in capsys.readouterr().err and snapshot() == before


def test_a_remeasured_champion_must_end_under_the_candidates_fingerprint(local_workspace, monkeypatch):
    """Item 4: re-measured, the champion's evidence must carry the candidate's fingerprint, or the model is refused."""
    from mnistgen import promotion

    champion_of("vae")
    use_models("vae", evaluate={**tiny_evaluation_sections()["evaluate"], "num_samples": 300})
    candidate("vae", epochs=3)
    real = promotion.measure_val

    def drifting(model, paths, p, device):
        metrics, evidence = real(model, paths, p, device)
        return metrics, {**evidence, "fingerprint": "0000000000000000"}

    monkeypatch.setattr(promotion, "measure_val", drifting)
    code, report = promote_now()
    assert code == 2 and "not the candidate's" in report["models"]["vae"]["reason"]


def test_one_models_failure_is_its_own_and_the_others_are_decided(local_workspace, capsys):
    """Item 6 broken on purpose: the vae's evidence is unreadable; the gan is still decided and registered."""
    use_models("vae", "gan")
    candidate("vae")
    candidate("gan")
    Path("evaluation/vae/evidence.pt").write_bytes(b"not a tensor file")
    code, report = promote_now()
    assert code == 2 and report["failed"] == ["vae"]
    assert report["models"]["gan"]["decision"] == gate.PROMOTE and aliases("gan")["champion"] == "1"
    assert report["models"]["vae"]["decision"] == gate.ERROR and "mnist-vae" not in snapshot()
    err = capsys.readouterr()
    assert "error: vae: vae: cannot read the candidate's validation metrics or evidence" in err.err
    assert "gan: promote v1 to champion" in err.out and "vae: error (" in err.out


def test_a_value_that_is_not_a_number_is_unmeasurable(local_workspace):
    """Item 6: a candidate whose primary metric is NaN is unmeasurable, named in one line, not a regression."""
    use_models("vae")
    candidate("vae", fid_cls=float("nan"))
    code, report = promote_now()
    assert code == 2 and report["models"]["vae"]["decision"] == gate.UNMEASURABLE
    assert "fid_cls is not a number" in report["models"]["vae"]["reason"]


def test_a_champion_that_moved_while_the_gate_decided_is_not_overwritten(workspace, monkeypatch):
    """Item 7 broken on purpose: another job moves @champion between the gate's decision and the move."""
    from mnistgen import promotion

    champion_of("vae")
    candidate("vae", epochs=3)
    other = candidate_version_of_another_run()
    real_decide = promotion.decide

    def decide_then_someone_moves_it(c, rule, ctx):
        decision = real_decide(c, rule, ctx)
        ctx.registry.client.set_registered_model_alias("mnist-vae", "champion", other)  # a concurrent promotion
        return decision

    monkeypatch.setattr(promotion, "decide", decide_then_someone_moves_it)
    code, report = promote_now()
    decided = report["models"]["vae"]
    assert code == 2 and decided["decision"] == gate.ERROR and "no longer v1" in decided["reason"]
    assert aliases("vae")["champion"] == other  # the other job's move stands
    assert [r["to"] for r in Registry().history("mnist-vae")] == ["1"]


def candidate_version_of_another_run() -> str:
    """A version of mnist-vae registered by hand (not through promote), as another job would have made one."""
    client = tracking.client()
    run_id = candidate("vae", epochs=1, seed=3)
    uri = json.loads(Path("models/vae/run.json").read_text())["model_uri"]
    version = client.create_model_version(
        "mnist-vae", uri, run_id=run_id, tags={"grade": "default"}, model_id=uri.removeprefix("models:/")
    )
    return str(version.version)


def test_the_lock_lets_one_mover_at_a_time_and_breaks_a_dead_ones(workspace, monkeypatch):

    champion_of("vae")
    registry = Registry()
    with (
        registry.lock("mnist-vae"),
        pytest.raises(ChampionMoved, match="holds mnist-vae.lock"),
        Registry().lock("mnist-vae", wait=0.5),
    ):
        pass
    with registry.lock("mnist-vae"):  # released: taken again at once
        pass
    tracking.client().create_registered_model("mnist-vae.lock", description=json.dumps({"at": time.time() - 3600}))
    with Registry().lock("mnist-vae", wait=0.5):  # an hour old: its holder died; broken, then taken
        pass
    assert "mnist-vae.lock" not in snapshot()


@pytest.mark.slow  # several promotions, or processes: the slow tier
def test_two_promotions_at_once_leave_one_coherent_history(local_workspace, tmp_path):
    """Two promote processes against one store, each with its own better candidate, started together: whatever the
    interleaving, every ledger record starts where the previous one ended, the keys do not collide, and @champion is
    the last record's version."""
    champion_of("vae")  # one SQLite store shared by two workspaces; the lock's own test runs on the team server too
    jobs = []
    for seed, folder in ((1, tmp_path / "job-a"), (2, tmp_path / "job-b")):
        candidate("vae", epochs=3 + seed, seed=seed)
        shutil.copytree(local_workspace, folder, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
        jobs.append(folder)
    env = {**os.environ, "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mnistgen.stages.promote", *PROMOTE_ARGS],
            cwd=job,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for job in jobs
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert set(codes) <= {0, 2} and 0 in codes, outputs
    history = Registry().history("mnist-vae")
    assert all(later["from"] == earlier["to"] for earlier, later in zip(history, history[1:])), history
    assert aliases("vae")["champion"] == history[-1]["to"]
    tags = tracking.client().get_registered_model("mnist-vae").tags
    assert len([k for k in tags if k.startswith("ledger.")]) == len(history)
    for code, (_, err) in zip(codes, outputs):
        assert code == 0 or "no longer v" in err, err[-2000:]  # a job that lost the race says so in one line


def test_history_flags_a_move_made_outside_the_tool_and_rollback_keeps_the_grade_rules(workspace, capsys):
    from mnistgen.commands import registry as registry_module

    champion_of("vae")
    candidate("vae", epochs=3, grade="smoke")  # registered, never champion over a default one
    code, report = promote_now()
    smoke = report["models"]["vae"]["candidate_version"]
    assert code == 0 and aliases("vae")["champion"] == "1"
    assert registry_module.main(["rollback", "mnist-vae", "--to", smoke]) == 2
    refusal = (  # a team server refuses any smoke champion; a local store one below the champion's grade
        "graded smoke: on a team server only a graded, non-smoke run is champion"
        if tracking.is_team_server()
        else "graded smoke, below champion v1's default"
    )
    assert refusal in capsys.readouterr().err and aliases("vae")["champion"] == "1"
    assert registry_module.main(["rollback", "mnist-vae", "--to", smoke, "--force"]) == 0
    assert aliases("vae")["champion"] == smoke and Registry().history("mnist-vae")[-1]["forced"] is True
    tracking.client().set_registered_model_alias("mnist-vae", "champion", "1")  # by hand, outside mnistgen
    capsys.readouterr()
    assert registry_module.main(["history", "mnist-vae"]) == 0
    out = capsys.readouterr().out
    assert "(forced)" in out and f"warning: now: @champion is v1, but the ledger's last move left v{smoke}" in out


def test_a_grade_is_earned_not_claimed(local_workspace):
    """Item 8 broken on purpose: a run labelled paper with the default recipe, and a run of uncommitted params, are
    graded experiment and do not displace a default champion, however much better."""
    champion_of("vae")
    candidate("vae", epochs=8, grade="paper")
    code, report = promote_now()
    decided = report["models"]["vae"]
    assert code == 0 and decided["decision"] == gate.KEEP and decided["candidate_grade"] == "experiment"
    assert "graded experiment (claims paper" in decided["reason"]
    version = tracking.client().get_model_version("mnist-vae", decided["candidate_version"])
    assert version.tags["grade"] == "experiment" and version.tags["grade_claimed"] == "paper"
    use_models("vae", commit=False, model_changes={"lr": 0.002})  # an edited, uncommitted params.yaml
    candidate("vae", epochs=8)
    code, report = promote_now()
    assert report["models"]["vae"]["candidate_grade"] == "experiment" and aliases("vae")["champion"] == "1"


def test_evidence_on_another_device_is_moved_before_it_is_paired():
    """Item 5: a champion re-measured on a GPU meets a candidate read from disk. A tensor that says it lives on cuda:0
    (and moves to the CPU when asked) stands in for the GPU: pairing moves it, and refuses tensors it did not move."""
    from mnistgen import comparison
    from mnistgen.config import GateSettings
    from mnistgen.utils import StageError

    class OnGPU(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

        def to(self, *args, **kwargs):
            return self.as_subclass(torch.Tensor).to(*args, **kwargs)

    torch.manual_seed(0)
    feats = {"": torch.randn(64, 8)}
    champion = {"sample_feats": {"": (feats[""] + 0.1).as_subclass(OnGPU)}}
    candidate_evidence = {"sample_feats": {"": feats[""] + 0.2}}
    settings = GateSettings(alpha=0.05, bootstrap=100, bootstrap_seed=0)
    [c] = comparison.paired_comparisons(["fid_cls"], candidate_evidence, champion, {"": torch.randn(128, 8)}, settings)
    assert c.metric == "fid_cls" and c.eval_sd > 0
    with pytest.raises(StageError, match="evidence on cpu, cuda:0"):
        comparison.one_device(candidate_evidence["sample_feats"][""], champion["sample_feats"][""])


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
    imports = logged_model.imported_packages([*folder.rglob("*.py")])
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
