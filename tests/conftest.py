import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_PINNED, pin_tiny_evaluators, tiny_evaluation_sections, write_params, write_prepared
from xdist.scheduler import LoadFileScheduling

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Under pytest-xdist (the slow tier's `-n 2`) each worker, and every stage it starts, gets its share of the cores:
# two torch processes that each use every core slow each other down many times over.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // WORKERS)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """Every test that needs a real pipeline, a server, a browser or a drill belongs to the slow tier."""
    for item in items:
        if any(item.get_closest_marker(m) for m in ("e2e", "browser", "drill", "team")):
            item.add_marker(pytest.mark.slow)


TEAM_STACK_FILES = {path.name for path in Path(__file__).parent.glob("test_*.py") if "team_stack" in path.read_text()}


def worker_scope(nodeid: str) -> str:
    """How the slow tier's `-n 2` shares out tests: a file's tests on one worker, so its module fixtures are built
    once, and every file that uses the session's team stack on one worker, so the stack starts once."""
    file = nodeid.split("::", 1)[0]
    return "the team stack" if Path(file).name in TEAM_STACK_FILES else file


class OneTeamStack(LoadFileScheduling):
    def _split_scope(self, nodeid: str) -> str:
        return worker_scope(nodeid)


def pytest_xdist_make_scheduler(config, log):
    return OneTeamStack(config, log)


@pytest.fixture(scope="session")
def mnist_mirror() -> Path:
    """The offline copy of the four official MNIST files (MNIST_MIRROR, else ../shared/mnist)."""
    path = Path(os.environ.get("MNIST_MIRROR") or ROOT.parent / "shared" / "mnist").resolve()
    if not (path / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"no MNIST mirror at {path}")
    os.environ["MNIST_MIRROR"] = str(path)  # for the stages the tests start
    return path


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A migrated, empty MLflow SQLite store to copy: creating one takes seconds, copying it next to nothing."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


def team_missing() -> str | None:
    """Why the team stack cannot start here (None when it can)."""
    import importlib.util

    from mnistgen.team.settings import PG_BIN

    if not (PG_BIN / "initdb").exists():
        return f"team stack: PostgreSQL is not installed ({PG_BIN}/initdb; apt-get install postgresql)"
    for module, package in (("swift", "swift"), ("psycopg", "psycopg[binary]"), ("boto3", "boto3"), ("flask_wtf", "flask-wtf")):
        if importlib.util.find_spec(module) is None:
            return f"team stack: {package} is not installed (pip install -r requirements-team.lock)"
    return None


def free_port_block(count: int) -> int:
    """A first port p with p .. p+count-1 all free on loopback."""
    import random
    import socket

    for _ in range(200):
        base = random.randint(20000, 40000)
        try:
            socks = []
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free block of ports")


@pytest.fixture(scope="session")
def team_stack():
    """The team stack (PostgreSQL, Swift s3api, mlflow server + basic-auth), started once for the session on free
    loopback ports in a private state folder, and stopped at the end. Yields team.settings.Settings."""
    reason = team_missing()
    if reason:
        pytest.skip(reason)
    import shutil
    import tempfile

    from mnistgen.team import stack
    from mnistgen.team.settings import Settings

    state = Path(tempfile.mkdtemp(prefix="mnistgen-team-test-", dir="/var/tmp"))
    base = free_port_block(6)
    overrides = {
        "TEAM_HOST": "127.0.0.1",
        "TEAM_STATE_DIR": str(state),
        "TEAM_PG_PORT": str(base),
        "TEAM_MLFLOW_PORT": str(base + 1),
        "TEAM_S3_PORT": str(base + 2),
    }
    settings = Settings.load(env_file=state / ".env", create=True, overrides=overrides)
    try:
        stack.up(settings, log=lambda *_: None)
        yield settings
    finally:
        stack.down(settings, log=lambda *_: None)
        shutil.rmtree(state, ignore_errors=True)


def clear_registry(settings) -> None:
    """Delete every registered model on the team server (as admin), so a test starts from an empty registry."""
    from mlflow import MlflowClient

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": settings["TEAM_ADMIN_PASSWORD"]})
    try:
        client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
        for model in client.search_registered_models():
            client.delete_registered_model(model.name)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def use_team_account(monkeypatch, settings, user: str = "ci") -> None:
    for key, value in settings.client_env(user).items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """Synthetic digits, tiny pinned evaluators and their references made by the reference stage itself: what every
    test's workspace copies, so candidates are measured for real (evaluation.measure) in seconds."""
    work = tmp_path_factory.mktemp("world")
    write_prepared(work / "data" / "prepared", n_train=512, n_val=256, n_test=256)
    write_params(work, **tiny_evaluation_sections())
    pin_tiny_evaluators(work)
    result = subprocess.run(
        [sys.executable, "-m", "mnistgen.stages.reference", "--data", "data/prepared", "--evaluators", TINY_PINNED]
        + ["--out", "models/evaluator", "--metrics", "metrics/evaluator.json"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return work
