"""The MLflow side against real SQLite stores in temp folders: the train stage's run, the logged
pyfunc model, the Run context manager, big batches, tracking off and the experiment kind tag."""

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, tiny_model_params, write_params, write_prepared
from mlflow import MlflowClient

from mnistgen import logged_model, tracking

RUN_SECTION = {
    "grade": "default",
    "seed": 0,
    "device": "cpu",
    "deterministic": True,
    "experiment": "test-exp",
    "sample_every": 1,
    "dist_timeout_s": 60,
}


def train_args(model: str) -> list[str]:
    return [model, "--data", "data/prepared", "--out", f"models/{model}", "--curves", f"curves/{model}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, empty_store):
    """One tiny VAE trained for two epochs by the real stage script; the tests below only read it."""
    work = tmp_path_factory.mktemp("train")
    shutil.copy(empty_store, work / "mlflow.db")
    write_prepared(work / "data" / "prepared")
    write_params(work, train=RUN_SECTION, models={"vae": tiny_model_params("vae", epochs=2, precision="bf16")})
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    result = subprocess.run(
        [sys.executable, "-m", "mnistgen.stages.train", *train_args("vae")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return work, result


@pytest.fixture
def store(tmp_path, monkeypatch, empty_store) -> MlflowClient:
    """A fresh SQLite store in this test's own folder, which is also the working directory."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowClient(tracking_uri=uri)


def test_train_stage_logs_params_curves_tags_and_model(trained):
    work, result = trained
    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    experiment = client.get_experiment_by_name("test-exp")
    assert experiment.artifact_location.endswith("mlartifacts")
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"  # the UI opens on its runs
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "vae"
    params = run.data.params
    assert params["model.family"] == "vae" and params["model.latent_dim"] == "4" and params["model.beta"] == "1.0"
    assert params["train.seed"] == "0"
    assert "model.n_critic" not in params and "model.betas" not in params  # only the family's own params
    history = client.get_metric_history(run.info.run_id, "kl")
    assert [m.step for m in history] == [1, 2]
    for key in ("loss", "recon", "val_loss", "val_kl", "images_per_second"):
        assert key in run.data.metrics
    for key in ("git_commit", "data_hash", "params_hash", "device", "torch_version"):
        assert run.data.tags[key]
    assert run.data.tags["device"] == "cpu"
    assert run.data.tags["precision"] == "bfloat16"  # models.vae.precision: the run says which precision trained it
    # where the seconds were measured: the CPU, and how many of its logical CPUs torch's threads use
    assert run.data.tags["cpu"] and 1 <= int(run.data.tags["torch_threads"]) <= int(run.data.tags["cpus"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert artifacts == {"samples/samples_epoch_001.png", "samples/samples_epoch_002.png"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "figures")} == {"figures/curves.png", "figures/samples.png"}
    record = json.loads((work / "models" / "vae" / "run.json").read_text())
    assert record["run_id"] == run.info.run_id and record["model_uri"].startswith("models:/")
    assert (work / "curves" / "vae" / "kl.csv").read_text().startswith("epoch,train,val")
    assert "train vae: 2 epochs" in result.stdout and f"on cpu ({run.data.tags['torch_threads']} threads)" in result.stdout


def test_logged_model_has_signature_and_predicts_images(trained):
    work, _ = trained
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")  # explicit: other tests set it process-wide too
    uri = json.loads((work / "models" / "vae" / "run.json").read_text())["model_uri"]
    model = mlflow.pyfunc.load_model(uri)
    assert model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] in ([-1, 4], (-1, 4))
    images = model.predict(np.zeros((3, 4), dtype=np.float32))
    assert images.shape == (3, 28, 28) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    sampled = model.predict(np.zeros((1, 4), dtype=np.float32), params={"count": 5, "seed": 1})
    assert sampled.shape == (5, 28, 28)
    model_dir = mlflow.artifacts.download_artifacts(uri)
    assert not list(Path(model_dir).rglob("*.pkl"))  # models-from-code: nothing pickled


def test_unreachable_tracking_store_fails_before_training(tmp_path):
    write_prepared(tmp_path / "data" / "prepared")
    write_params(tmp_path, models={"ae": tiny_model_params("ae")})
    env = {**os.environ, "MLFLOW_TRACKING_URI": "sqlite:////nonexistent/folder/mlflow.db"}
    result = subprocess.run(
        [sys.executable, "-m", "mnistgen.stages.train", *train_args("ae")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: MLflow tracking store sqlite:////nonexistent/folder/mlflow.db cannot be reached: folder /nonexistent/folder does not exist"
    )
    assert not (tmp_path / "models").exists() and not (tmp_path / "checkpoints").exists()


def test_run_context_ends_finished_on_success_and_failed_on_error(store):
    with tracking.Run.start("ctx", "ok", {"stage": "test"}) as run:
        run.log_metrics({"loss": 1.0}, step=1)
    assert store.get_run(run.run_id).info.status == "FINISHED"

    with pytest.raises(RuntimeError, match="boom"), tracking.Run.start("ctx", "broken", {}) as failed:
        raise RuntimeError("boom")
    assert store.get_run(failed.run_id).info.status == "FAILED"


def test_run_context_keeps_the_original_error_when_the_store_is_gone_too(store, monkeypatch):
    def store_down(*args, **kwargs):
        raise OSError("store down")

    with pytest.raises(KeyError, match="original"), tracking.Run.start("ctx", "lost", {}) as run:
        monkeypatch.setattr(MlflowClient, "set_terminated", store_down)
        raise KeyError("original")
    assert store.get_run(run.run_id).info.status == "RUNNING"  # could not be marked; the error the user sees is the real one


def test_failing_training_marks_the_run_failed(store, monkeypatch):
    """The train stage in-process with training itself raising: the stage fails and its run reads FAILED."""
    write_prepared(Path("data/prepared"), n_train=64, n_val=32, n_test=32)
    # deterministic off: in-process, it would switch torch's deterministic mode on for every later test
    write_params(Path.cwd(), train={**RUN_SECTION, "deterministic": False}, models={"ae": tiny_model_params("ae")})
    stage = importlib.import_module("mnistgen.stages.train")

    def broken(*args, **kwargs):
        raise RuntimeError("injected training failure")

    monkeypatch.setattr(stage.training, "train", broken)
    monkeypatch.setattr(sys, "argv", ["train.py", *train_args("ae")])
    with pytest.raises(RuntimeError, match="injected training failure"):
        stage.main()
    (run,) = store.search_runs([store.get_experiment_by_name("test-exp").experiment_id])
    assert run.info.run_name == "ae" and run.info.status == "FAILED"
    assert not Path("models/ae").exists()


def test_one_call_logs_more_than_one_store_batch(store):
    """MLflow splits big batches itself (1,000 metrics / 100 params per request): one call logs them all."""
    with tracking.Run.start("batch", "big", {}) as run:
        run.log_params({f"p{i:03d}": i for i in range(250)})
        run.log_metrics({f"m{i:04d}": float(i) for i in range(2500)}, step=3)
        run.set_tags({f"t{i:03d}": i for i in range(150)})
    data = store.get_run(run.run_id).data
    assert len(data.params) == 250 and data.params["p249"] == "249"
    assert len(data.metrics) == 2500 and data.metrics["m2499"] == 2499.0
    assert {f"t{i:03d}" for i in range(150)} <= set(data.tags)
    assert store.get_metric_history(run.run_id, "m0007")[0].step == 3


def test_tracking_off_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNISTGEN_TRACKING", "off")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////nonexistent/folder/mlflow.db")  # never touched
    with tracking.Run.start("off", "x", {}) as run:
        run.log_params({"a": 1})
        run.log_metrics({"b": 2.0}, step=1)
        run.set_tags({"c": 3})
        assert run.log_generator(tmp_path / "w.pt", tmp_path / "c.json", 4, None) is None
    assert run.run_id is None and tracking.Run.resume("abc").run_id is None
    assert list(tmp_path.iterdir()) == []


def test_an_existing_experiment_without_the_kind_tag_gets_it(store):
    created = store.create_experiment("old-exp")  # as an older version of the project created it
    assert tracking.EXPERIMENT_KIND_TAG not in store.get_experiment(created).tags
    assert tracking.experiment_id("old-exp") == created
    assert store.get_experiment(created).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    fresh = tracking.experiment_id("new-exp")
    assert store.get_experiment(fresh).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_store_lost_mid_stage_ends_it_in_one_line_and_the_next_start_marks_the_run_failed(tmp_path, monkeypatch):
    """A tracking server that dies mid-stage cannot hear the run end: the stage stops with one line, the run id is
    remembered, and the next stage that reaches the store marks it FAILED (no run stays RUNNING forever)."""
    from mlflow.exceptions import MlflowException

    from mnistgen.utils import StageError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    real_end = MlflowClient.set_terminated

    def store_down(self, *args, **kwargs):
        raise MlflowException("API request to endpoint /api/2.0/mlflow/runs/update failed: Connection refused")

    with (
        pytest.raises(StageError, match="failed during the stage .*will be marked FAILED by the next stage"),
        tracking.Run.start("lost", "ae", {}) as run,
    ):
        monkeypatch.setattr(MlflowClient, "set_terminated", store_down)
        raise MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-batch failed: Connection refused")
    monkeypatch.setattr(MlflowClient, "set_terminated", real_end)
    assert tracking.client().get_run(run.run_id).info.status == "RUNNING"
    with tracking.Run.start("lost", "vae", {}):
        pass
    assert tracking.client().get_run(run.run_id).info.status == "FAILED"
    assert not tracking.UNFINISHED.exists()


def test_a_dvc_experiment_tracks_into_its_parent_repo_and_tags_its_runs(tmp_path, monkeypatch, empty_store):
    """A queued experiment runs in .dvc/tmp/exps/…: DVC_ROOT (the repo it was queued from) picks the store, and
    DVC_EXP_NAME / DVC_EXP_BASELINE_REV become the run's tags; plain `dvc repro` adds no such tags."""
    parent, temp_copy = tmp_path / "repo", tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc"
    temp_copy.mkdir(parents=True)
    shutil.copy(empty_store, parent / "mlflow.db")
    monkeypatch.chdir(temp_copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MNISTGEN_TRACKING", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(parent))
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{parent}/mlflow.db" and tracking.dvc_experiment_tags() == {}
    monkeypatch.setenv("DVC_EXP_NAME", "lucid-puma")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    with tracking.Run.start("queued", run_name="ae", tags={"stage": "train"}) as run:
        pass
    client = MlflowClient(tracking_uri=f"sqlite:///{parent}/mlflow.db")
    tags = client.get_run(run.run_id).data.tags
    assert (tags["dvc_exp_name"], tags["dvc_exp_baseline_rev"], tags["stage"]) == ("lucid-puma", "a" * 40, "train")
    assert client.get_experiment_by_name("queued").artifact_location == (parent / "mlartifacts").as_uri()  # not in the temp copy


def test_the_code_shipped_with_a_logged_model_imports_on_its_own(tmp_path):
    """The registered model carries a copy of logged_model.MODEL_CODE (MLflow puts it first on sys.path when it loads):
    that copy alone must build every family, or `mlflow models serve` fails on a module left behind."""
    package = tmp_path / "code" / "mnistgen"
    package.mkdir(parents=True)
    for name in logged_model.MODEL_CODE:
        source = logged_model.PACKAGE_DIR / name
        if source.is_dir():
            shutil.copytree(source, package / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, package / name)
    script = (
        "import mnistgen, mnistgen.models as m, yaml, pathlib\n"
        f"assert pathlib.Path(mnistgen.__file__).parent == pathlib.Path({str(package)!r})\n"
        f"params = yaml.safe_load(open({str(ROOT / 'params.yaml')!r}))['models']\n"
        "from mnistgen.models import model_params\n"
        "for name, section in params.items(): m.build_model(model_params(section, name))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(package.parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]


STAGE_SCRIPT = """
import time
from mnistgen import logged_model, tracking
with tracking.Run.start("stage", "train vae", {}) as run:
    print(run.run_id, flush=True)
    time.sleep(120)
"""


def start_stage(store_uri: str, **env) -> tuple[subprocess.Popen, str]:
    """A stage process with an open run (heartbeat every 0.2 s); returns it and its run id once the run exists."""
    proc = subprocess.Popen(
        [sys.executable, "-c", STAGE_SCRIPT],
        env={**os.environ, "MLFLOW_TRACKING_URI": store_uri, "MNISTGEN_HEARTBEAT_SECONDS": "0.2", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, proc.stdout.readline().strip()


@pytest.mark.slow  # processes and a server's retries: the slow tier
def test_sigterm_and_sigint_end_the_run_killed(store):
    import signal

    uri = os.environ["MLFLOW_TRACKING_URI"]
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc, run_id = start_stage(uri)
        assert store.get_run(run_id).info.status == "RUNNING"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)  # drains the pipes: a child blocked on a full one never exits
        assert proc.returncode != 0
        assert store.get_run(run_id).info.status == "KILLED", stderr[-2000:]


@pytest.mark.slow  # processes and a server's retries: the slow tier
def test_a_run_whose_process_was_sigkilled_is_failed_by_the_next_run_of_its_stage(store, monkeypatch):
    import signal
    import time

    uri = os.environ["MLFLOW_TRACKING_URI"]
    dead, dead_run = start_stage(uri)
    live, live_run = start_stage(uri)  # the same stage, running elsewhere: its heartbeat stays fresh
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait(timeout=60)
        assert store.get_run(dead_run).info.status == "RUNNING"  # nobody could mark it
        time.sleep(3.5)
        monkeypatch.setenv("MNISTGEN_STALE_SECONDS", "3")  # 15 missed beats: the live run, beating every 0.2 s, is fresh
        with tracking.Run.start("stage", "other stage", {}):  # another stage's start leaves both alone
            pass
        assert store.get_run(dead_run).info.status == "RUNNING"
        with tracking.Run.start("stage", "train vae", {}):
            pass
        failed = store.get_run(dead_run)
        assert failed.info.status == "FAILED" and failed.data.tags["mnistgen.failed_because"].startswith("no heartbeat for")
        assert store.get_run(live_run).info.status == "RUNNING"
    finally:
        live.kill()


@pytest.mark.slow  # processes and a server's retries: the slow tier
def test_the_client_retries_a_failing_server_three_times_then_fails_in_one_line(monkeypatch):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mnistgen.utils import StageError

    requests = []

    class Unavailable(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(503)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"):
        monkeypatch.delenv(var, raising=False)  # the project's defaults, not another test's
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        with pytest.raises(StageError) as failed:
            tracking.check_reachable()
    finally:
        server.shutdown()
    assert len(requests) == 4  # one try and three retries, with backoff
    message = str(failed.value)
    assert "\n" not in message and message.startswith(
        f"MLflow tracking store http://127.0.0.1:{server.server_address[1]} cannot be reached"
    )
