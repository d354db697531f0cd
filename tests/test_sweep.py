"""The shared Optuna sweep (`mnistgen sweep`): typed search space, validation-only objective,
pruning, -S overrides that `dvc exp run` applies, and workers sharing one study."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, tiny_model_params, write_params, write_prepared

from mnistgen.config import ParamsError, read_params
from mnistgen.models import load_model_params

SPACE = {
    "lr": {"type": "float", "low": 0.000001, "high": 0.01, "log": True},
    "beta": {"type": "float", "low": 0.5, "high": 2.0, "log": False},
}


def sweep_section(**changes) -> dict:
    return {**read_params(ROOT / "params.yaml")["sweep"], "space": {"vae": SPACE}, **changes}


def workspace(tmp_path: Path, epochs: int = 2, **sweep_changes) -> Path:
    """Tiny synthetic data without a test split (a sweep must never read it) and a tiny VAE to sweep."""
    write_prepared(tmp_path / "prepared", n_train=512, n_val=128)
    (tmp_path / "prepared" / "test.pt").unlink()
    models = {"vae": tiny_model_params("vae", epochs=epochs), "gan": tiny_model_params("gan", epochs=1, batch_size=64)}
    write_params(tmp_path, models=models, sweep=sweep_section(**sweep_changes))
    return tmp_path


def test_the_repo_sweep_space_is_valid_for_its_models():
    from mnistgen import sweep

    params = read_params(ROOT / "params.yaml")
    settings = sweep.validate_section(sweep.SweepParams, params["sweep"], "sweep")
    assert {"vae", "wgan"} <= set(settings.space)
    for model in settings.space:
        sweep.load_space(params, model)


@pytest.mark.parametrize(
    "space, message",
    [
        (
            {"lr": {"type": "float", "low": 0.01, "high": 0.001, "log": True}},
            "sweep.space.vae.lr.float: value error, needs low < high",
        ),
        (
            {"lr": {"type": "float", "low": 0.001, "high": 0.01, "log": True, "step": 2}},
            "sweep.space.vae.lr.float.step: unknown key",
        ),
        ({"lr": {"type": "float", "low": 0.001, "high": 0.01}}, "sweep.space.vae.lr.float.log: missing key"),
        ({"n_critic": {"type": "int", "low": 1, "high": 5, "log": False}}, "sweep.space.vae.n_critic: not a key of models.vae"),
        (
            {"epochs": {"type": "float", "low": 1.0, "high": 5.0, "log": False}},
            "sweep.space.vae.epochs: input should be a valid integer",
        ),
        ({"arch": {"type": "choice", "choices": ["mlp", "rnn"]}}, "sweep.space.vae.arch: input should be 'conv' or 'mlp'"),
    ],
)
def test_a_bad_search_space_is_refused_with_its_key_named(space, message):
    from mnistgen import sweep

    params = {**read_params(ROOT / "params.yaml"), "sweep": sweep_section(space={"vae": space})}
    with pytest.raises(ParamsError, match=message.replace(".", r"\.")):
        sweep.load_space(params, "vae")


def test_best_params_become_overrides_that_dvc_applies_to_params_yaml(tmp_path):
    """`-S` values go through DVC's own parser (dvc.utils.hydra, what `dvc exp run -S` calls) and come out typed."""
    from dvc.utils.hydra import apply_overrides

    from mnistgen import sweep

    best = {"lr": 1.2345678e-05, "n_critic": 3, "gp_weight": 2.0, "penalty": "one_sided"}
    overrides = sweep.overrides("wgan", best)
    assert overrides == [
        "models.wgan.lr=0.0000123457",
        "models.wgan.n_critic=3",
        "models.wgan.gp_weight=2.0",
        "models.wgan.penalty=one_sided",
    ]
    assert sweep.exp_run_command("wgan", best, 12).startswith(
        "MNISTGEN_SELECTED_FROM=12 dvc exp run -S 'models.wgan.lr=0.0000123457' -S "
    )
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    apply_overrides(tmp_path / "params.yaml", overrides)
    wgan = load_model_params("wgan", tmp_path / "params.yaml")  # strict: a string or int where a float belongs fails
    assert (wgan.lr, wgan.n_critic, wgan.gp_weight, wgan.penalty) == (pytest.approx(1.23457e-05), 3, 2.0, "one_sided")


@pytest.mark.slow
def test_a_trial_worse_than_the_median_is_pruned_on_validation_data(tmp_path, monkeypatch):
    import optuna

    from mnistgen import sweep

    monkeypatch.chdir(workspace(tmp_path, epochs=3, pruner_startup_trials=1, pruner_warmup_epochs=0))
    monkeypatch.setenv("MNISTGEN_TRACKING", "off")
    params = read_params("params.yaml")
    settings, base = sweep.load_space(params, "vae")
    run_params = sweep.validate_section(sweep.RunParams, params["train"], "train")
    objective = sweep.Objective("vae", base, settings, run_params, Path("prepared"), None, None, "prune")
    assert objective.name == "val_loss"
    study, parent = sweep.open_study("prune", f"sqlite:///{tmp_path}/optuna.db", "vae", settings, worker=0)
    assert parent is None  # tracking off: no MLflow runs
    study.enqueue_trial({"lr": 0.01, "beta": 1.0})
    study.enqueue_trial({"lr": 0.000001, "beta": 1.0})  # learns next to nothing: far above the first trial after one epoch
    study.optimize(objective, n_trials=2)
    first, second = study.get_trials()
    assert first.state == optuna.trial.TrialState.COMPLETE and sorted(first.intermediate_values) == [1, 2, 3]
    assert second.state == optuna.trial.TrialState.PRUNED and sorted(second.intermediate_values) == [1]
    assert second.intermediate_values[1] > first.intermediate_values[1]
    assert first.value == first.intermediate_values[3]  # the objective is the last epoch's validation loss


def test_a_gan_is_scored_by_fid_against_validation_images(tmp_path, monkeypatch):
    import torch

    from mnistgen import data, metrics, sweep
    from mnistgen.evaluators import Classifier
    from mnistgen.utils import StageError

    monkeypatch.chdir(workspace(tmp_path))
    params = read_params("params.yaml")
    settings = sweep.validate_section(sweep.SweepParams, {**params["sweep"], "fid_samples": 300}, "sweep")
    run_params = sweep.validate_section(sweep.RunParams, params["train"], "train")
    with pytest.raises(StageError, match="give --evaluator"):
        sweep.Objective("gan", params["models"]["gan"], settings, run_params, Path("prepared"), None, None, "s")
    evaluator = tmp_path / "evaluator"
    evaluator.mkdir()
    torch.manual_seed(0)
    torch.save(
        Classifier(8, "strided").state_dict(), evaluator / "classifier.pt"
    )  # an untrained feature space is a feature space
    (evaluator / "spaces.json").write_text(
        json.dumps([{"suffix": "", "classifier": "classifier.pt", "arch": "strided", "width": 8}])
    )
    objective = sweep.Objective("gan", params["models"]["gan"], settings, run_params, Path("prepared"), evaluator, None, "s")
    assert objective.name == "val_fid_cls" and len(objective.fid.val_feats) == 128  # the validation split's features
    torch.manual_seed(0)
    model = sweep.build_model(sweep.model_params(params["models"]["gan"]))
    score = objective.fid(model)
    assert model.training is False and objective.fid(model) == score  # its own seeded samples, scored in eval mode
    # The definition: FID_cls of fid_samples samples (the objective's seed) against the validation split's features.
    samples = model.sample(300, torch.Generator().manual_seed(objective.fid.seed))
    classifier = objective.fid.classifier
    val_images = data.to_float(data.load_split(Path("prepared"), "val").images, torch.device("cpu"))
    expected = metrics.fid(classifier.features_and_probs(samples)[0], classifier.features_and_probs(val_images)[0])
    assert score == pytest.approx(expected, rel=1e-5)


def run_workers(work: Path, storage: str, study: str, trials: int, env: dict) -> list[subprocess.CompletedProcess]:
    cmd = [
        sys.executable,
        "-m",
        "mnistgen.commands.sweep",
        "vae",
        "--trials",
        str(trials),
        "--storage",
        storage,
        "--study",
        study,
        "--data",
        "prepared",
    ]
    procs = [
        subprocess.Popen(
            [*cmd, "--worker", str(k), "--out", f"best{k}.json"],
            cwd=work,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for k in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return outputs


def check_shared_study(work: Path, storage: str, study_name: str, trials: int, tracking_uri: str):
    """Both workers' trials are in the study, each once, each finished; MLflow nests them under one sweep run."""
    import optuna
    from mlflow import MlflowClient

    study = optuna.load_study(study_name=study_name, storage=storage)
    found = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in found) == list(range(2 * trials))  # none lost, none twice
    assert len({t._trial_id for t in found}) == 2 * trials
    assert {t.state.name for t in found} <= {"COMPLETE", "PRUNED"} and any(t.state.name == "COMPLETE" for t in found)
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("mnist-sweep")
    runs = client.search_runs([experiment.experiment_id], f"tags.optuna_study = '{study_name}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    by_number = {int(r.data.tags["optuna_trial"]): r for r in children}
    assert sorted(by_number) == list(range(2 * trials))
    for t in found:
        run = by_number[t.number]
        assert run.data.tags["optuna_state"] == t.state.name
        assert run.info.status == ("FINISHED" if t.state.name == "COMPLETE" else "KILLED")
        assert float(run.data.params["trial.lr"]) == pytest.approx(t.params["lr"])
    summaries = [json.loads((work / f"best{k}.json").read_text()) for k in range(2)]
    last = max(summaries, key=lambda s: s["trials"])
    assert last["trials"] == 2 * trials and last["best_value"] == pytest.approx(study.best_value)
    assert parents[0].data.metrics["best_value"] == pytest.approx(study.best_value)
    return study, last


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(tmp_path, empty_store):
    work = workspace(tmp_path)
    shutil.copy(empty_store, work / "mlflow.db")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db", "PYTHONPATH": str(ROOT / "src")}
    env.pop("MNISTGEN_TRACKING", None)
    storage = f"sqlite:///{work}/optuna.db"
    outputs = run_workers(work, storage, "shared", 3, env)
    study, best = check_shared_study(work, storage, "shared", 3, env["MLFLOW_TRACKING_URI"])
    assert all("MNISTGEN_SELECTED_FROM=" in out and " dvc exp run -S 'models.vae.lr=" in out for out in outputs)
    from dvc.utils.hydra import apply_overrides

    apply_overrides(work / "params.yaml", best["overrides"])  # the best trial's params, applied as `dvc exp run -S` does
    applied = load_model_params("vae", work / "params.yaml")
    assert (applied.lr, applied.beta) == (
        pytest.approx(study.best_params["lr"], rel=1e-5),
        pytest.approx(study.best_params["beta"], rel=1e-5),
    )
    states = {name: [t.state.name for t in study.trials].count(name) for name in ("COMPLETE", "PRUNED")}
    print(f"two workers, sqlite: {len(study.trials)} trials {states}, best {study.best_value:.3f} {study.best_params}")


@pytest.mark.slow
@pytest.mark.team
def test_two_workers_share_one_study_on_the_team_postgresql(tmp_path, team_stack, monkeypatch):
    """The same on the team stack: the study in its PostgreSQL (role and database `optuna`), the runs on its MLflow server."""
    from conftest import use_team_account

    work = workspace(tmp_path)
    use_team_account(monkeypatch, team_stack, "ci")
    monkeypatch.delenv("MNISTGEN_TRACKING", raising=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    study = f"team-{tmp_path.name}"
    run_workers(work, team_stack.optuna_storage, study, 2, env)
    check_shared_study(work, team_stack.optuna_storage, study, 2, team_stack.tracking_uri)


def test_team_settings_give_the_sweeps_storage_and_an_older_env_file_still_loads(tmp_path):
    """`mnistgen team up` generates the optuna role's password; `env`, `down` and `status` still load an env file
    written before sweeps existed (no storage exported until the next `up`); the read-only account gets none."""
    from mnistgen.team import settings as stack

    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}=secret{i}\n" for i, k in enumerate(stack.SECRET_KEYS) if k != "TEAM_OPTUNA_PASSWORD"))
    env_file.chmod(0o600)  # as `team up` writes it (one others may read is refused)
    older = stack.Settings.load(env_file=env_file, overrides={"TEAM_PG_PORT": "55432", "TEAM_HOST": "127.0.0.1"})
    assert older.optuna_storage is None and "MNISTGEN_OPTUNA_STORAGE" not in stack.exports(older, "ci")
    with pytest.raises(stack.StackError, match="TEAM_CI_PASSWORD"):  # the other secrets stay required
        stack.Settings.load(env_file=env_file, overrides={"TEAM_CI_PASSWORD": ""})
    upped = stack.Settings.load(env_file=env_file, create=True, overrides={"TEAM_PG_PORT": "55432", "TEAM_HOST": "127.0.0.1"})
    assert upped.optuna_storage == f"postgresql+psycopg://optuna:{upped['TEAM_OPTUNA_PASSWORD']}@127.0.0.1:55432/optuna"
    assert env_file.read_text().count("TEAM_PG_PASSWORD=") == 1  # only the missing secret was added
    assert f"export MNISTGEN_OPTUNA_STORAGE={shlex.quote(upped.optuna_storage)}" in stack.exports(upped, "ci")
    assert "MNISTGEN_OPTUNA_STORAGE" not in stack.exports(upped, "reader")
