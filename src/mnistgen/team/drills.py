"""Fault and load drills against a running team stack (`mnistgen team up` first; loopback only).

    mnistgen team drills [all|wrong-password|kill-tracking|pg-restart|store-down|load] [--clients 8 --steps 1000]

Each drill prints what it did and one line `drill <name>: PASS|FAIL ...` with its figures; all of them
write a JSON record to <TEAM_STATE_DIR>/drills.json. The drills use the ci account, their own scratch
folders under /tmp and the experiment `drills`; they stop and restart the stack's own processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import data
from ..utils import sha256_file, write_json
from .mlflow_server import start_mlflow, stop_mlflow
from .postgres import start_postgres, stop_postgres
from .processes import os_user
from .settings import Settings
from .swift import start_swift, stop_swift

ROOT = Path(__file__).resolve().parents[3]  # the repository (an editable install): the drills run its stage scripts
EXPERIMENT = "drills"
SCRATCH: list[Path] = []  # the drills' folders, removed after each drill


def tiny_params(families: dict[str, int]) -> dict:
    """The repo's params.yaml with tiny MLP models (epochs per family) tracking into the drills experiment."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"] = {
        name: {
            **params["models"][name],
            "arch": "mlp",
            "hidden": 64,
            "latent_dim": 4,
            "epochs": epochs,
            "batch_size": 32,
            "lr": 0.001,
        }
        for name, epochs in families.items()
    }
    params["gate"] = {name: params["gate"][name] for name in families}
    params["train"] = {**params["train"], "experiment": EXPERIMENT}
    return params


def workspace(families: dict[str, int], n_train: int = 2048) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="mnistgen-drill-"))
    SCRATCH.append(folder)
    (folder / "params.yaml").write_text(yaml.safe_dump(tiny_params(families), sort_keys=False))
    write_synthetic_digits(folder / "data" / "prepared", {"train": n_train, "val": 256, "test": 256})
    return folder


def write_synthetic_digits(prepared: Path, sizes: dict[str, int], seed: int = 0) -> None:
    """Prepared splits of synthetic 'digits' (no MNIST needed): a bright bar on faint noise, its position
    the label. The drills train on them, and so do the tests (tests/helpers.write_prepared)."""
    prepared.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for split, n in sizes.items():
        labels = torch.arange(n) % 10
        images = torch.randint(0, 30, (n, 28, 28), generator=g, dtype=torch.uint8)
        for i, y in enumerate(labels.tolist()):
            r, c = 2 + (y // 5) * 12, 2 + (y % 5) * 5
            images[i, r : r + 10, c : c + 5] = 255
        data.save_split(data.Split(images, labels), prepared / f"{split}.pt")
    write_json(  # as the prepare stage describes its output
        prepared / "meta.json",
        {
            "params": {"synthetic": seed, "limit_train": 0, "limit_test": 0},
            "sha256": {split: sha256_file(prepared / f"{split}.pt") for split in sizes},
            "sizes": sizes,
        },
    )


def client_env(s: Settings, **changes) -> dict[str, str]:
    # the stages get the users' defaults (retries included), not this process's fast-failing client settings
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "AWS_", "MLFLOW_S3", "MLFLOW_HTTP_"))}
    env.update(s.client_env("ci"))
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(changes)
    return env


def train(folder: Path, model: str, env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mnistgen.stages.train",
            model,
            "--data",
            "data/prepared",
            "--out",
            f"models/{model}",
            "--curves",
            f"curves/{model}",
        ],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def last_line(text: str) -> str:
    lines = [
        line for line in text.strip().splitlines() if line.strip() and "warn" not in line.lower() and not line.startswith(" ")
    ]
    summaries = [line for line in lines if line.startswith(("train ", "error:", "promote:"))]  # a stage's own one-line summary
    return (summaries or lines or [""])[-1]


def mlflow_client(s: Settings):
    os.environ.update(s.client_env("ci"))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=s.tracking_uri, registry_uri=s.tracking_uri)


def registry_snapshot(s: Settings) -> dict:
    client = mlflow_client(s)
    return {
        m.name: {
            "versions": sorted(int(v.version) for v in client.search_model_versions(f"name = '{m.name}'")),
            "aliases": dict(m.aliases),
        }
        for m in client.search_registered_models()
    }


# ---------------------------------------------------------------- drills


def drill_wrong_password(s: Settings) -> dict:
    folder = workspace({"vae": 50})
    started = time.perf_counter()
    proc = train(folder, "vae", client_env(s, MLFLOW_TRACKING_PASSWORD="wrong-password"))
    _, err = proc.communicate(timeout=300)
    seconds = time.perf_counter() - started
    trained = (folder / "checkpoints").exists() or (folder / "models").exists()
    ok = proc.returncode == 1 and "refused user 'ci' (401)" in err and not trained
    return {"pass": ok, "exit": proc.returncode, "seconds": round(seconds, 1), "line": last_line(err), "trained": trained}


def drill_kill_tracking(s: Settings) -> dict:
    """SIGKILL the mlflow server while a model trains; the stage ends with one line; after a restart the
    next stage marks the orphaned run FAILED and trains to the end (resuming from its checkpoint)."""
    before = registry_snapshot(s)
    folder = workspace({"vae": 40}, n_train=4096)
    env = client_env(s)
    proc = train(folder, "vae", env)
    client = mlflow_client(s)
    exp = None
    deadline = time.time() + 120
    run = None
    while time.time() < deadline and run is None:  # wait until the run has logged two epochs
        time.sleep(0.5)
        exp = exp or client.get_experiment_by_name(EXPERIMENT)
        if exp:
            runs = [
                r
                for r in client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=5)
                if r.data.metrics and len(client.get_metric_history(r.info.run_id, "loss")) >= 2
            ]
            run = runs[0] if runs else None
    if run is None:
        proc.kill()
        return {"pass": False, "why": "the run never logged two epochs"}
    killed_at = time.perf_counter()
    stop_mlflow(s, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    stage_seconds_after_kill = time.perf_counter() - killed_at
    first: dict[str, Any] = {
        "exit": proc.returncode,
        "line": last_line(err),
        "seconds_after_kill": round(stage_seconds_after_kill, 1),
        "traceback": "Traceback" in err,
    }
    restart = time.perf_counter()
    start_mlflow(s, os_user(s))
    restart_seconds = time.perf_counter() - restart
    status_after_restart = client.get_run(run.info.run_id).info.status
    second = train(folder, "vae", env)
    out, err2 = second.communicate(timeout=600)
    final_status = client.get_run(run.info.run_id).info.status
    after = registry_snapshot(s)
    ok = (
        proc.returncode == 1
        and first["line"].startswith("error: MLflow tracking store")
        and not first["traceback"]
        and second.returncode == 0
        and final_status == "FAILED"
        and before == after
    )
    return {
        "pass": ok,
        "first_stage": first,
        "mlflow_restart_seconds": round(restart_seconds, 1),
        "killed_run": run.info.run_id,
        "its_status_after_restart": status_after_restart,
        "its_status_after_next_stage": final_status,
        "second_stage": {"exit": second.returncode, "line": last_line(out + err2)},
        "registry_unchanged": before == after,
    }


def drill_pg_restart(s: Settings) -> dict:
    """Two stages with a PostgreSQL restart between them: the second must carry on."""
    folder = workspace({"ae": 1, "vae": 1})
    env = client_env(s)
    first = train(folder, "ae", env)
    out1, err1 = first.communicate(timeout=300)
    t = time.perf_counter()
    stop_postgres(s)
    start_postgres(s, os_user(s))
    restart_seconds = time.perf_counter() - t
    second = train(folder, "vae", env)
    out2, err2 = second.communicate(timeout=300)
    ok = first.returncode == 0 and second.returncode == 0
    return {
        "pass": ok,
        "pg_restart_seconds": round(restart_seconds, 1),
        "first": {"exit": first.returncode, "line": last_line(out1 + err1)},
        "second": {"exit": second.returncode, "line": last_line(out2 + err2)},
    }


def drill_store_down(s: Settings) -> dict:
    """Swift stopped after the candidates are logged, before promote registers: exit 2, nothing registered, no alias moved."""
    folder = workspace({"ae": 1, "vae": 1})
    env = client_env(s)
    for model in ("ae", "vae"):
        proc = train(folder, model, env)
        _, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            return {"pass": False, "why": f"train {model} failed: {last_line(err)}"}
        # What evaluate would leave: validation metrics and their evidence (the drill is about the store, not the metrics).
        (folder / "metrics" / "val").mkdir(parents=True, exist_ok=True)
        (folder / "evaluation" / model).mkdir(parents=True, exist_ok=True)
        metrics = {
            "recon_mse": 0.001,
            "iwae_nll": 50.0,
            "fid_cls": 1.0,
            "classes_present": 10,
            "split": "val",
            "protocol": "drill",
        }
        (folder / "metrics" / "val" / f"{model}.json").write_text(json.dumps(metrics))
        torch.save({"fingerprint": "drill", "protocol": {"split": "val"}}, folder / "evaluation" / model / "evidence.pt")
    before = registry_snapshot(s)
    stop_swift(s)
    try:
        promoted = subprocess.run(
            [
                sys.executable,
                "-m",
                "mnistgen.stages.promote",
                *("--metrics", "metrics/val", "--models", "models", "--evaluation", "evaluation"),
                *("--evaluator", "models/evaluator", "--data", "data/prepared", "--out", "reports"),
            ],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        start_swift(s, os_user(s))
    after = registry_snapshot(s)
    errors = [line for line in promoted.stderr.splitlines() if line.startswith("error:")]
    ok = promoted.returncode == 2 and before == after and "Traceback" not in promoted.stderr
    return {
        "pass": ok,
        "exit": promoted.returncode,
        "error_lines": errors,
        "summary": last_line(promoted.stdout),
        "registry_unchanged": before == after,
    }


def _load_client(args) -> dict:
    tracking_uri, user, password, steps, index, payload = args
    os.environ.update(
        {
            "MLFLOW_TRACKING_URI": tracking_uri,
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": password,
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
    )
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient()
    experiment = client.get_experiment_by_name(f"{EXPERIMENT}-load")
    if experiment is None:
        raise RuntimeError(f"experiment {EXPERIMENT}-load is missing: the load drill creates it first")
    run = client.create_run(experiment.experiment_id, run_name=f"client-{index}")
    latencies = []
    for step in range(steps):
        now = int(time.time() * 1000)
        metrics = [
            Metric("loss", 1.0 / (step + 1), now, step),
            Metric("val_loss", 2.0 / (step + 1), now, step),
            Metric("lr", 0.001 * index, now, step),
        ]
        t = time.perf_counter()
        client.log_batch(run.info.run_id, metrics=metrics)
        latencies.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.bin"
        path.write_bytes(payload)
        t = time.perf_counter()
        client.log_artifact(run.info.run_id, str(path))
        artifact_seconds = time.perf_counter() - t
    client.set_terminated(run.info.run_id)
    return {"run_id": run.info.run_id, "latencies": latencies, "artifact_seconds": artifact_seconds}


def drill_load(s: Settings, clients: int = 8, steps: int = 1000, artifact_mb: int = 2) -> dict:
    client = mlflow_client(s)
    if not client.get_experiment_by_name(f"{EXPERIMENT}-load"):
        client.create_experiment(f"{EXPERIMENT}-load")
    payload = os.urandom(artifact_mb * 1024 * 1024)
    started = time.perf_counter()
    jobs = [(s.tracking_uri, "ci", s["TEAM_CI_PASSWORD"], steps, i, payload) for i in range(clients)]
    with ProcessPoolExecutor(clients) as pool:
        results = list(pool.map(_load_client, jobs, timeout=900))
    wall = time.perf_counter() - started
    latencies = sorted(x for r in results for x in r["latencies"])
    counted, wrong, artifacts_ok = 0, 0, 0
    for i, r in enumerate(results):
        for key, expect in (
            ("loss", lambda st: 1.0 / (st + 1)),
            ("val_loss", lambda st: 2.0 / (st + 1)),
            ("lr", lambda st, i=i: 0.001 * i),
        ):
            history = client.get_metric_history(r["run_id"], key)
            counted += len(history)
            wrong += sum(1 for m in history if abs(m.value - expect(m.step)) > 1e-12) + abs(
                steps - len({m.step for m in history})
            )
        files = client.list_artifacts(r["run_id"])
        artifacts_ok += any(f.path == "weights.bin" and f.file_size == len(payload) for f in files)
    expected = clients * steps * 3
    quantile = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
    return {
        "pass": counted == expected and wrong == 0 and artifacts_ok == clients,
        "clients": clients,
        "log_batch_calls": len(latencies),
        "values_expected": expected,
        "values_counted": counted,
        "values_wrong_or_missing": wrong,
        "artifacts_ok": artifacts_ok,
        "artifact_mb": artifact_mb,
        "p50_ms": round(quantile(0.50), 1),
        "p95_ms": round(quantile(0.95), 1),
        "max_ms": round(latencies[-1] * 1000, 1),
        "wall_seconds": round(wall, 1),
        "calls_per_second": round(len(latencies) / wall, 1),
        "artifact_upload_seconds_p50": round(statistics.median(r["artifact_seconds"] for r in results), 2),
    }


DRILLS: dict[str, Callable[..., dict]] = {
    "wrong-password": drill_wrong_password,
    "kill-tracking": drill_kill_tracking,
    "pg-restart": drill_pg_restart,
    "store-down": drill_store_down,
    "load": drill_load,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="mnistgen team drills", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("drill", nargs="?", default="all", choices=["all", *DRILLS])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args(argv)
    s = Settings.load()
    record_file = s.state / "drills.json"
    records = json.loads(record_file.read_text()) if record_file.exists() else {}
    failed = 0
    for name in DRILLS if args.drill == "all" else [args.drill]:
        started = time.perf_counter()
        try:
            result = DRILLS[name](s, args.clients, args.steps) if name == "load" else DRILLS[name](s)
        except Exception as err:  # noqa: BLE001 - a drill that crashes is a failed drill
            result = {"pass": False, "crash": f"{type(err).__name__}: {err}"}
        finally:
            while SCRATCH:
                shutil.rmtree(SCRATCH.pop(), ignore_errors=True)
        result["drill_seconds"] = round(time.perf_counter() - started, 1)
        records[name] = result
        record_file.write_text(json.dumps(records, indent=1))
        failed += not result["pass"]
        print(
            f"drill {name}: {'PASS' if result['pass'] else 'FAIL'} {json.dumps({k: v for k, v in result.items() if k != 'pass'})}",
            flush=True,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
