"""Team mode against the real stack (PostgreSQL, Swift s3api, mlflow server with basic-auth): roles, wrong
passwords, the champion loaded by alias in a folder outside the checkout, and a DVC remote on the same store.

The registry and gate tests themselves run against the team server too: tests/test_registry.py's
`workspace` fixture is parametrized over the embedded SQLite store and the team server.
"""

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from conftest import clear_registry, use_team_account
from helpers import ROOT, enter_world, git, write_params, write_prepared
from mlflow.exceptions import MlflowException
from test_registry import candidate, champion_of, promote_now, snapshot

from mnistgen import tracking
from mnistgen.commands.team import set_dvc_remote

pytestmark = [pytest.mark.team, pytest.mark.slow]


@pytest.fixture
def team(team_stack, tmp_path, monkeypatch):
    """This test's own folder, an empty team registry, the ci account."""
    monkeypatch.chdir(tmp_path)
    clear_registry(team_stack)
    use_team_account(monkeypatch, team_stack, "ci")
    return team_stack


@pytest.fixture
def team_world(team, world, tmp_path):
    """The team fixture in a folder holding the registry tests' world: data, pinned evaluators, references."""
    enter_world(world, tmp_path)
    return team


def test_reader_gets_403_and_its_promote_exits_2_changing_nothing(team_world, monkeypatch, capsys):
    team = team_world
    before = champion_of("vae")
    version = before["mnist-vae"]["aliases"]["champion"]
    run_id = candidate("vae", epochs=3)  # better: the ci account would promote it
    use_team_account(monkeypatch, team, "reader")
    reader = tracking.client()
    assert reader.get_model_version_by_alias("mnist-vae", "champion").version == version  # reading is allowed
    model_uri = json.loads(Path("models/vae/run.json").read_text())["model_uri"]
    for action in (
        lambda: reader.set_registered_model_alias("mnist-vae", "champion", version),
        lambda: reader.delete_model_version("mnist-vae", version),
        lambda: reader.create_model_version("mnist-vae", model_uri, run_id=run_id, model_id=model_uri[len("models:/") :]),
    ):
        with pytest.raises(MlflowException) as denied:
            action()
        assert denied.value.get_http_status_code() == 403
    capsys.readouterr()
    code, report = promote_now()
    err = capsys.readouterr().err
    assert code == 2 and report["exit_code"] == 2
    assert "MLflow user 'reader' may not register versions or move aliases (403" in err and "Traceback" not in err
    use_team_account(monkeypatch, team, "ci")
    assert snapshot() == before


def test_wrong_password_promote_exits_2_with_one_line(team_world, monkeypatch, capsys):
    team = team_world
    before = champion_of("vae")
    candidate("vae", epochs=3)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    capsys.readouterr()
    code, _ = promote_now()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [
        f"error: MLflow tracking server {team.tracking_uri} refused user 'ci' (401): set MLFLOW_TRACKING_USERNAME "
        "and MLFLOW_TRACKING_PASSWORD to a valid account"
    ]
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", team["TEAM_CI_PASSWORD"])
    assert snapshot() == before


def test_wrong_password_stops_train_before_it_starts(team, tmp_path, monkeypatch):
    write_prepared(tmp_path / "data" / "prepared")
    from helpers import tiny_model_params

    write_params(tmp_path, models={"vae": tiny_model_params("vae", epochs=50)})
    env = {**os.environ, "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mnistgen.stages.train",
            "vae",
            "--data",
            "data/prepared",
            "--out",
            "models/vae",
            "--curves",
            "curves/vae",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: MLflow tracking server {team.tracking_uri} refused user 'ci' (401)")
    )
    assert not (tmp_path / "models").exists() and not (tmp_path / "checkpoints").exists()  # no training, no output


def test_champion_loads_by_alias_in_a_fresh_folder_without_the_checkout(team_world, tmp_path_factory):
    champion_of("vae")
    fresh = tmp_path_factory.mktemp("elsewhere")
    script = textwrap.dedent("""
        import sys, numpy as np, mlflow
        model = mlflow.pyfunc.load_model("models:/mnist-vae@champion")
        images = model.predict(np.zeros((3, 4), np.float32))
        print(images.shape, sys.modules["mnistgen"].__file__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=fresh, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    shape, module_file = result.stdout.strip().splitlines()[-1].split(") ")
    assert shape == "(3, 28, 28"
    assert not Path(module_file).resolve().is_relative_to(ROOT)  # the model's own shipped code, not the checkout's


def dvc(*args, cwd, env) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(Path(sys.executable).with_name("dvc")), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"dvc {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


def test_dvc_push_then_a_fresh_clone_pulls_and_reproduces_nothing(team_stack, tmp_path):
    """A two-stage DVC project pushed to the team store; a clone pulls it, `dvc repro` runs no stage, `dvc status -c` is clean."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    origin, clone = tmp_path / "origin", tmp_path / "clone"
    origin.mkdir()
    git("init", "-q", cwd=origin)
    dvc("init", "-q", cwd=origin, env=env)
    (origin / "make.py").write_text(
        "import sys, pathlib; pathlib.Path(sys.argv[2]).write_text(pathlib.Path(sys.argv[1]).read_text() * 1000)\n"
    )
    (origin / "seed.txt").write_text("digits\n")
    (origin / "dvc.yaml").write_text(
        textwrap.dedent(f"""
        stages:
          first:
            cmd: {sys.executable} make.py seed.txt big.txt
            deps: [make.py, seed.txt]
            outs: [big.txt]
          second:
            cmd: {sys.executable} make.py big.txt bigger.txt
            deps: [make.py, big.txt]
            outs: [bigger.txt]
    """)
    )
    dvc("remote", "add", "team", "s3://placeholder", cwd=origin, env=env)  # as .dvc/config names it; dvc-remote fills it
    set_dvc_remote(team_stack, "trainer", origin)  # the trainer's key pushes
    config = (origin / ".dvc" / "config.local").read_text()
    assert team_stack.s3_secret("trainer") in config and (origin / ".dvc" / "config.local").stat().st_mode & 0o777 == 0o600
    prefix = f"s3://{team_stack.dvc_bucket}/dvc-test-{uuid.uuid4().hex[:8]}"
    dvc("remote", "modify", "team", "url", prefix, cwd=origin, env=env)
    dvc("remote", "modify", "--local", "--unset", "team", "url", cwd=origin, env=env)
    dvc("repro", cwd=origin, env=env)
    dvc("push", cwd=origin, env=env)
    git("add", "-A", cwd=origin)
    git("commit", "-qm", "pipeline", cwd=origin)
    assert "secret_access_key" not in (origin / ".dvc" / "config").read_text()
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
    # the clone authenticates through the environment instead of a config.local, with the reader's key
    clone_env = {**env, **team_stack.s3_env("reader")}
    dvc("remote", "modify", "--local", "team", "endpointurl", team_stack.s3_endpoint, cwd=clone, env=env)
    dvc("remote", "default", "--local", "team", cwd=clone, env=env)
    dvc("pull", cwd=clone, env=clone_env)
    assert (clone / "bigger.txt").read_text() == "digits\n" * 1000 * 1000
    repro = dvc("repro", cwd=clone, env=clone_env)
    assert "Running stage" not in repro.stdout and "up to date" in repro.stdout.lower(), repro.stdout
    status = dvc("status", "-c", cwd=clone, env=clone_env)
    assert "in sync" in status.stdout.lower(), status.stdout
