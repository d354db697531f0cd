"""The promotion gate against a real SQLite registry in a temp folder, the pyfunc by alias, and serving."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny_model_params, write_params
from mnistgen import gate, tracking
from mnistgen.config import Floor, GateParams, ModelParams, from_dict
from mnistgen.models import build_model
from mnistgen.utils import write_json

MODELS = ("ae", "vae", "gan", "wgan")
GOOD = {
    "ae": {"recon_mse": 0.012, "fid_cls": 40.0},
    "vae": {"recon_mse": 0.02, "iwae_nll": 100.0, "fid_cls": 20.0},
    "gan": {"fid_cls": 10.0, "precision": 0.7, "recall": 0.5, "classes_present": 10},
    "wgan": {"fid_cls": 20.0, "precision": 0.6, "recall": 0.5, "classes_present": 10},
}


GATE = {
    name: {"primary": "fid_cls", "higher_is_better": False, "min_improvement": 0.0, "tolerance": 0.5,
           "floors": [{"metric": "fid_cls", "max": 60.0}, *([{"metric": "classes_present", "min": 8}] if name in ("gan", "wgan") else [])]}
    for name in MODELS
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    work = tmp_path_factory.mktemp("registry")
    old_cwd, old_uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(work)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    write_params(work, gate=GATE)  # the tests' own floors, independent of the repo's defaults
    yield work
    os.chdir(old_cwd)
    if old_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old_uri


def candidate(name: str, **changes) -> None:
    """Log a tiny model as a new training run and write its metrics, as train + evaluate would."""
    params = tiny_model_params(name)
    model = build_model(from_dict(ModelParams, params, "m"))
    folder = Path("models") / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "weights.pt")
    (folder / "config.json").write_text(json.dumps(params))
    run = tracking.Run.start("registry-test", name, {"git_commit": "abc", "params_hash": "p", "device": "cpu", "torch_version": "t"})
    uri = run.log_generator(folder / "weights.pt", folder / "config.json", 4, np.zeros((1, 4), dtype=np.float32))
    run.end()
    tracking.write_run_file(folder / "run.json", run, uri)
    write_json(f"metrics/{name}.json", {**GOOD[name], **changes, "evaluator_hash": "e" * 64})


def promote_now() -> tuple[int, dict]:
    import promote

    code = promote.main()
    return code, json.loads(open("reports/promotion.json").read())


def aliases() -> dict:
    client = tracking.client()
    out = {}
    for name in MODELS:
        registered = tracking.REGISTERED_NAMES[name]
        try:
            out[name] = {k: str(v) for k, v in client.get_registered_model(registered).aliases.items()}
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


def test_gate_rules_without_a_registry():
    rule = GateParams(primary="fid_cls", higher_is_better=False, min_improvement=1.0, tolerance=0.5,
                      floors=(Floor("fid_cls", max=50.0),))
    assert gate.decide("m", {"fid_cls": 40.0}, None, rule).decision == gate.PROMOTE
    assert gate.decide("m", {"fid_cls": 38.6}, {"fid_cls": 40.0}, rule).decision == gate.KEEP  # 1.4 < 1.5
    assert gate.decide("m", {"fid_cls": 38.0}, {"fid_cls": 40.0}, rule).decision == gate.PROMOTE
    assert gate.decide("m", {"fid_cls": 60.0}, None, rule).decision == gate.REJECT
    assert gate.decide("m", {}, None, rule).decision == gate.REJECT  # a missing floor metric is a breach


def test_first_candidates_passing_floors_become_champions(workspace):
    for name in MODELS:
        candidate(name)
    code, report = promote_now()
    assert code == 0
    assert all(report["models"][m]["decision"] == gate.PROMOTE for m in MODELS)
    assert aliases() == {m: {"champion": "1", "challenger": "1"} for m in MODELS}
    version = tracking.client().get_model_version("mnist-vae", "1")
    assert version.tags["metric.iwae_nll"] == "100.0" and version.tags["evaluator_hash"] == "e" * 64
    for key in ("git_commit", "data_hash", "params_hash"):
        assert key in version.tags
    assert "no champion yet" in (workspace / "reports" / "promotion.md").read_text()


def test_promote_twice_for_the_same_runs_registers_nothing_new(workspace):
    code, _ = promote_now()
    assert code == 0
    assert aliases() == {m: {"champion": "1", "challenger": "1"} for m in MODELS}


def test_worse_candidate_leaves_champion(workspace):
    for name in MODELS:
        candidate(name)
    candidate("gan", fid_cls=15.0)  # worse than 10.0
    code, report = promote_now()
    assert code == 0
    assert report["models"]["gan"]["decision"] == gate.KEEP
    assert aliases()["gan"] == {"champion": "1", "challenger": "2"}


def test_better_candidate_takes_the_title(workspace):
    for name in MODELS:
        candidate(name)
    candidate("gan", fid_cls=5.0)
    code, report = promote_now()
    assert code == 0 and report["models"]["gan"]["decision"] == gate.PROMOTE
    assert aliases()["gan"] == {"champion": "3", "challenger": "3"}
    assert "better by 5" in (workspace / "reports" / "promotion.md").read_text()


def test_candidate_under_a_floor_exits_1_and_moves_nothing(workspace):
    before = aliases()
    versions_before = len(tracking.client().search_model_versions("name = 'mnist-wgan'"))
    for name in MODELS:
        candidate(name)
    candidate("wgan", fid_cls=500.0, classes_present=3)
    code, report = promote_now()
    assert code == 1
    assert report["models"]["wgan"]["decision"] == gate.REJECT
    assert aliases() == before
    assert len(tracking.client().search_model_versions("name = 'mnist-wgan'")) == versions_before
    assert "REGRESSION" in (workspace / "reports" / "promotion.md").read_text()


def test_unreachable_registry_exits_2_and_changes_nothing(workspace, monkeypatch):
    before = aliases()
    for name in MODELS:
        candidate(name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////nonexistent/registry.db")
    code, report = promote_now()
    assert code == 2 and report["exit_code"] == 2
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace}/mlflow.db")
    assert aliases() == before


def test_pyfunc_by_alias_returns_images(workspace):
    import mlflow

    model = mlflow.pyfunc.load_model("models:/mnist-vae@champion")
    images = model.predict(np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32))
    assert images.shape == (6, 28, 28) and images.min() >= 0 and images.max() <= 1
    assert model.predict(np.zeros((1, 4), np.float32), params={"count": 3}).shape == (3, 28, 28)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_mlflow_models_serve_answers_with_digits_and_survives_garbage(workspace):
    port = free_port()
    bin_dir = os.path.dirname(sys.executable)  # mlflow and the uvicorn it starts live beside this python
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workspace}/mlflow.db", "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    mlflow_cli = os.path.join(bin_dir, "mlflow")
    server = subprocess.Popen([mlflow_cli, "models", "serve", "-m", "models:/mnist-wgan@champion", "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                time.sleep(0.5)
        status, body = post(port, json.dumps({"inputs": np.zeros((2, 4)).tolist()}).encode())
        assert status == 200, body
        images = np.asarray(json.loads(body)["predictions"])
        assert images.shape == (2, 28, 28) and 0 <= images.min() and images.max() <= 1
        status, body = post(port, json.dumps({"inputs": [[0.0] * 4], "params": {"count": 3}}).encode())
        assert status == 200 and np.asarray(json.loads(body)["predictions"]).shape == (3, 28, 28)
        for garbage in (b"\x00\xffnot json", b'{"inputs": [[1, 2, 3]]}', b'{"inputs": "hello"}', b'{"nothing": 1}'):
            status, _ = post(port, garbage)
            assert 400 <= status < 500, (garbage, status)
        status, _ = post(port, json.dumps({"inputs": [[0.5] * 4]}).encode())
        assert status == 200 and server.poll() is None  # still up after the garbage
    finally:
        server.terminate()
        server.wait(timeout=30)
