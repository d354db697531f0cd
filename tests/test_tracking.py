"""The train stage against a real MLflow SQLite store in a temp folder; the logged pyfunc model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, tiny_model_params, write_params, write_prepared


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("train")
    write_prepared(work / "data" / "prepared")
    run_section = {"seed": 0, "device": "cpu", "deterministic": True, "experiment": "test-exp", "sample_every": 1}
    write_params(work, train=run_section, models={"vae": {**tiny_model_params("vae"), "epochs": 2}})
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    result = subprocess.run([sys.executable, str(ROOT / "pipelines" / "train.py"), "vae"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, result


def test_train_stage_logs_params_curves_tags_and_model(trained):
    work, result = trained
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    experiment = client.get_experiment_by_name("test-exp")
    assert experiment.artifact_location.endswith("mlartifacts")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.family"] == "vae" and run.data.params["model.latent_dim"] == "4"
    assert run.data.params["train.seed"] == "0"
    history = client.get_metric_history(run.info.run_id, "kl")
    assert [m.step for m in history] == [1, 2]
    for key in ("loss", "recon", "val_loss", "val_kl", "images_per_second"):
        assert key in run.data.metrics
    for key in ("git_commit", "data_hash", "params_hash", "device", "torch_version"):
        assert run.data.tags[key]
    assert run.data.tags["device"] == "cpu"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert artifacts == {"samples/samples_epoch_001.png", "samples/samples_epoch_002.png"}
    record = json.loads((work / "models" / "vae" / "run.json").read_text())
    assert record["run_id"] == run.info.run_id and record["model_uri"].startswith("models:/")
    assert (work / "models" / "vae" / "curves.csv").read_text().startswith("epoch,")
    assert "train vae: 2 epochs" in result.stdout


def test_logged_model_has_signature_and_predicts_images(trained):
    work, _ = trained
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")  # explicit: other tests set it process-wide too
    uri = json.loads((work / "models" / "vae" / "run.json").read_text())["model_uri"]
    model = mlflow.pyfunc.load_model(uri)
    assert model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] in ([-1, 4], (-1, 4))
    images = model.predict(np.zeros((3, 4), dtype=np.float32))
    assert images.shape == (3, 28, 28) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    sampled = model.predict(np.zeros((1, 4), dtype=np.float32), params={"count": 5, "seed": 1})
    assert sampled.shape == (5, 28, 28)
    model_dir = mlflow.artifacts.download_artifacts(uri)
    assert not list(Path(model_dir).rglob("*.pkl"))  # models-from-code: nothing pickled


def test_unreachable_tracking_store_fails_before_training(tmp_path):
    write_prepared(tmp_path / "data" / "prepared")
    write_params(tmp_path, models={"ae": tiny_model_params("ae")})
    env = {**os.environ, "MLFLOW_TRACKING_URI": "sqlite:////nonexistent/folder/mlflow.db"}
    result = subprocess.run([sys.executable, str(ROOT / "pipelines" / "train.py"), "ae"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: MLflow tracking store sqlite:////nonexistent/folder/mlflow.db cannot be reached: folder /nonexistent/folder does not exist")
    assert not (tmp_path / "models").exists() and not (tmp_path / "checkpoints").exists()
