"""The team stack as one thing: PostgreSQL, OpenStack Swift with s3api, `mlflow server` with basic-auth.

`up` starts what is not running (and, on a stack fully up, changes nothing and says so), `down` stops what this
stack started and nothing else, `status` says which services run. The parts live in their own modules: settings
and secrets (settings), processes (processes), TLS (tls), PostgreSQL (postgres), Swift (swift) and the mlflow
server (mlflow_server). docs/team.md is the guide, docs/security.md the threat model.
"""

from __future__ import annotations

import json
import time
import urllib.error

from .mlflow_server import ensure_users, start_mlflow, stop_mlflow
from .postgres import start_postgres, stop_postgres
from .processes import https_get, os_user, pids_file, port_open, prepare_state, read_pids, rss_mb, service_python, stop_group
from .settings import SERVICES, Settings, StackError
from .swift import ensure_buckets, start_swift, stop_swift
from .tls import ensure_certificates


def healthy(s: Settings) -> bool:
    try:
        return https_get(s, f"{s.tracking_uri}/health") == 200 and https_get(s, f"{s.s3_endpoint}/healthcheck") == 200
    except (OSError, urllib.error.URLError):
        return False


def up(s: Settings, log=print) -> dict:
    """Start what is not running. On a stack that is fully up this changes nothing and says so."""
    user = os_user(s)
    prepare_state(s, user)
    running = read_pids(s)
    if all(name in running for name in SERVICES) and healthy(s):
        log(f"team: stack already up ({s.tracking_uri}); nothing changed")
        return json.loads((s.state / "stack.json").read_text())
    for name, service in (("PG", "postgres"), ("S3", "swift-proxy"), ("MLFLOW", "mlflow")):
        if service not in running and port_open(s.host, s.port(name)):
            raise StackError(f"port {s.port(name)} on {s.host} is taken (TEAM_{name}_PORT): stop what uses it or choose another")
    service_python(s, user)  # fails closed before anything starts
    times = {}
    started = time.perf_counter()
    try:
        steps = [
            ("postgres", start_postgres),
            ("swift", start_swift),
            ("buckets", lambda s, _: ensure_buckets(s)),
            ("mlflow", start_mlflow),
        ]
        if s.tls:
            steps.insert(0, ("certificates", ensure_certificates))
        for name, step in steps:
            t = time.perf_counter()
            step(s, user)
            times[name] = round(time.perf_counter() - t, 1)
            log(f"team: {name} up ({times[name]} s)")
        grant = ensure_users(s)
    except BaseException:
        if not running:  # we started everything: leave nothing half up. Else what ran before keeps running.
            down(s, log=lambda *_: None)
        raise
    total = round(time.perf_counter() - started, 1)
    pids = read_pids(s)
    memory = {name: round(rss_mb([pid]), 1) for name, pid in pids.items()}
    record = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "start_seconds": total,
        "step_seconds": times,
        "rss_mb": memory,
        "rss_mb_total": round(sum(memory.values()), 1),
        "grants": grant,
        "service_user": user,
        "tls": s.tls,
        "tracking_uri": s.tracking_uri,
        "s3_endpoint": s.s3_endpoint,
    }
    (s.state / "stack.json").write_text(json.dumps(record, indent=1))
    log(
        f"team: stack up in {total} s, {record['rss_mb_total']:.0f} MB resident ({', '.join(f'{k} {v:.0f}' for k, v in memory.items())}); {grant}"
    )
    return record


def down(s: Settings, log=print) -> None:
    """Stop what this stack started (pids recorded with their start times), and nothing else."""
    if not s.state.is_dir():
        log("team: no stack here")
        return
    stop_mlflow(s)
    stop_swift(s)
    stop_postgres(s)
    for pid in read_pids(s).values():
        stop_group(pid)
    pids_file(s).unlink(missing_ok=True)
    log("team: stack down")


def restart(s: Settings, log=print) -> dict:
    down(s, log)
    return up(s, log)


def status(s: Settings) -> dict[str, bool]:
    running = read_pids(s) if s.state.is_dir() else {}
    return {name: name in running for name in SERVICES}
