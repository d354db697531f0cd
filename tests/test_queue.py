"""A queue of DVC experiments (`dvc exp run --queue -S ...`, `dvc queue start -j 2`) on a small real-MNIST
profile: DVC's own queue, no broker server. Each experiment's MLflow run is tagged with its DVC name and baseline
commit, so `dvc exp show` and MLflow's compare view list the same runs."""

import json
import subprocess
import time

import pytest
import yaml
from helpers import ROOT

from mnistgen.commands import smoke as smoke_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
LEARNING_RATES = (
    "0.001",
    "0.002",
    "0.008",
)  # not the baseline's 0.004: an unchanged stage is restored from the run cache, no new run


def shrink(params: dict) -> dict:
    """The smoke profile cut further: the AE only, 2 epochs, a small evaluation."""
    params["models"] = {"ae": {**params["models"]["ae"], "epochs": 2}}
    params["gate"] = {"ae": params["gate"]["ae"]}
    params["evaluate"].update(num_samples=1000, num_real=1000, kid_subsets=10, kid_subset_size=500, interp_pairs=50, bootstrap=10)
    return params


def dvc(*args, cwd, check=True):
    result = smoke_pipeline.dvc(*args, cwd=cwd, capture=True)
    assert not check or result.returncode == 0, f"dvc {' '.join(args)}:\n{(result.stdout + result.stderr)[-5000:]}"
    return result


def exp_rows(shown: list) -> dict:
    """`dvc exp show --json` -> {experiment name: (rev, params.yaml data, metrics/test/ae.json data)}."""
    rows = {}
    for baseline in shown:
        for group in baseline.get("experiments") or []:
            for rev in group["revs"]:
                data = rev["data"]
                rows[rev["name"]] = (
                    rev["rev"],
                    data["params"]["params.yaml"]["data"],
                    data["metrics"]["metrics/test/ae.json"]["data"],
                )
    return rows


def test_three_queued_experiments_are_three_tagged_mlflow_runs(tmp_path, mnist_mirror):
    work = smoke_pipeline.make_workspace(tmp_path / "repo", ROOT / "params-smoke.yaml")
    (work / "params.yaml").write_text(yaml.safe_dump(shrink(yaml.safe_load((work / "params.yaml").read_text())), sort_keys=False))
    dvc("repro", "evaluate@ae", cwd=work)  # the baseline: the experiments then rerun only train@ae and evaluate@ae
    smoke_pipeline.git("add", "-A", cwd=work)
    smoke_pipeline.git("-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "baseline", cwd=work)
    baseline = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, capture_output=True, text=True, check=True).stdout.strip()

    for lr in LEARNING_RATES:
        dvc("exp", "run", "--queue", "evaluate@ae", "-S", f"models.ae.lr={lr}", cwd=work)
    started = time.monotonic()
    dvc("queue", "start", "-j", "2", cwd=work)
    try:
        while True:  # bounded wait: every task leaves Queued/Running
            status = dvc("queue", "status", cwd=work).stdout
            if not any(word in status for word in ("Queued", "Running")):
                break
            assert time.monotonic() - started < 900, status
            time.sleep(3)
    finally:
        dvc("queue", "stop", cwd=work, check=False)
    seconds = time.monotonic() - started
    failed = [line.split()[0] for line in status.splitlines() if "Failed" in line]
    assert status.count("Success") == 3, status + "".join(
        dvc("queue", "logs", task, cwd=work, check=False).stdout[-3000:] for task in failed
    )

    rows = exp_rows(json.loads(dvc("exp", "show", "--json", cwd=work).stdout))
    assert len(rows) == 3 and sorted(str(p["models"]["ae"]["lr"]) for _, p, _ in rows.values()) == list(LEARNING_RATES)
    assert all(m["recon_mse"] > 0 and m["fid_cls"] > 0 for _, _, m in rows.values())
    table = dvc(
        "exp",
        "show",
        "--md",
        "--no-pager",
        "--drop",
        ".*",
        "--keep",
        "^Experiment$|^State$|^fid_cls$|^precision$|^recall$|^recon_mse$|^models.ae.lr$",
        cwd=work,
    ).stdout
    assert all(f"[{name}]" in table for name in rows)
    (tmp_path / "exp_show.txt").write_text(table)
    print(f"\n3 experiments, queue -j 2: {seconds:.0f} s\n{table}")

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")  # the parent repo's store: DVC_ROOT in every experiment
    runs = client.search_runs([client.get_experiment_by_name("mnist-generative").experiment_id], "tags.dvc_exp_name != ''")
    by_name = {r.data.tags["dvc_exp_name"]: r for r in runs}
    assert set(by_name) == set(rows) and len(runs) == 3
    for name, (rev, params, metrics) in rows.items():
        run = by_name[name]
        assert run.info.status == "FINISHED" and run.data.tags["dvc_exp_baseline_rev"] == baseline
        assert run.data.tags["git_commit"].startswith(baseline)  # the experiment runs on its baseline with -S applied
        assert float(run.data.params["model.lr"]) == params["models"]["ae"]["lr"]
        assert run.data.metrics["test_fid_cls"] == pytest.approx(metrics["fid_cls"])  # evaluate logged into the same run
        ref = subprocess.run(
            ["git", "rev-parse", f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"],
            cwd=work,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert ref == rev  # the two tags name the experiment's git ref
