"""The team pull-request flow (mnistgen pr): a teammate's full run, pulled and checked by CI, promoted on merge.

The end-to-end test drives the real commands against the local team stack: `dvc repro report` as the trainer
account on all of MNIST (one tiny model, graded default), `dvc push`, a commit; then in a clone, as CI would,
`mnistgen pr check` as reader and `mnistgen pr promote` as ci. Tampering (a forged metric recorded in
dvc.lock, a code change after the run) must fail the check.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import clear_registry, use_team_account
from helpers import TINY_EVALUATE, git, tiny_model_params
from mlflow.exceptions import MlflowException

from mnistgen import tracking
from mnistgen.commands import pr as pull_request
from mnistgen.commands import smoke

BIN = Path(sys.executable).parent


def test_only_the_promote_stage_may_differ_from_the_lock():
    status = {
        "promote": [{"changed deps": {"metrics/val": "modified"}}],
        "train@vae": [{"changed deps": {"src/mnistgen/models": "modified"}}],
    }
    problems = pull_request.lock_problems(status)
    assert len(problems) == 1 and "stage train@vae does not match dvc.lock" in problems[0]
    assert pull_request.lock_problems({"promote": status["promote"]}) == []


def test_every_numeric_metric_must_be_the_logged_value():
    files = {"val": {"iwae_nll": 92.5, "fid_cls": 10.0, "protocol": "abc", "ok": True}, "test": {"iwae_nll": 91.0}}
    logged = {"val_iwae_nll": 92.5, "val_fid_cls": 10.0, "test_iwae_nll": 91.0}
    assert pull_request.metric_problems("vae", files, logged) == []
    forged = pull_request.metric_problems("vae", files, {**logged, "val_fid_cls": 10.5})
    assert forged == ["metrics/val/vae.json: fid_cls is 10.0, but the run logged 10.5 as val_fid_cls"]
    missing = pull_request.metric_problems("vae", files, {"val_iwae_nll": 92.5, "val_fid_cls": 10.0})
    assert missing == ["metrics/test/vae.json: iwae_nll is 91.0, but the run logged nothing as test_iwae_nll"]


def test_the_summary_shows_the_candidates_samples_beside_the_champions(tmp_path, monkeypatch, empty_store):
    """What the gate saw, for the pull request: samples-<model>.png beside the summary, linked from it."""
    import shutil

    import torch

    from mnistgen import figures

    monkeypatch.chdir(tmp_path)
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    figures.save_grid(torch.rand(16, 1, 28, 28), tmp_path / "evaluation" / "vae" / "samples.png", nrow=4)
    out = tmp_path / "artifacts"
    out.mkdir()
    (out / "promotion.json").write_text(json.dumps({"models": {"vae": {"decision": "promote", "champion_version": None}}}))
    (out / "promotion.md").write_text("# Promotion gate: decided\n")
    pull_request.show_samples(out)
    assert (out / "samples-vae.png").stat().st_size > 1000
    summary = (out / "promotion.md").read_text()
    assert summary.startswith("# Promotion gate") and "- vae: [samples-vae.png](samples-vae.png) (promote)" in summary


def test_github_serialises_promotions_into_the_team_registry():
    workflow = yaml.safe_load((Path(__file__).resolve().parents[1] / ".github" / "workflows" / "ci.yml").read_text())
    promote = workflow["jobs"]["team-promote"]
    assert promote["concurrency"]["group"].startswith("team-promote-") and promote["concurrency"]["cancel-in-progress"] is False
    assert "pr promote" in " ".join(step.get("run", "") for step in promote["steps"])


def run(*args: str, cwd: Path, env: dict, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, (
            f"{' '.join(args)} (exit {result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    return result


def account_env(stack, user: str) -> dict:
    """A shell of `user` on this stack: its MLflow account, the stack's settings for `mnistgen team dvc-remote`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "TEAM_", "AWS_"))}
    return {**env, **stack.values, **stack.client_env(user), "PATH": f"{BIN}{os.pathsep}{env['PATH']}"}


def pr_workspace(folder: Path) -> Path:
    """The repository as a teammate's checkout, with params for one tiny VAE on all of MNIST: a default-grade run."""
    smoke.make_workspace(folder, None)
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["models"] = {"vae": tiny_model_params("vae", epochs=1, batch_size=256)}
    shared = {k: v for k, v in params["gate"].items() if k not in params["models"] and not isinstance(v, dict)}
    params["gate"] = {**shared, "vae": {**params["gate"]["vae"], "floors": [{"metric": "iwae_nll", "max": 10000.0}]}}
    params["evaluate"].update(TINY_EVALUATE)  # still measured with the pinned ruler, evaluators/v1
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git("commit", "-qam", "one tiny VAE", cwd=folder)
    return folder


@pytest.mark.team
@pytest.mark.slow
def test_pull_request_flow_promotes_the_version_the_pulled_run_logged(team_stack, tmp_path, mnist_mirror, monkeypatch):
    clear_registry(team_stack)
    origin, clone = pr_workspace(tmp_path / "teammate"), tmp_path / "ci"
    trainer, reader, ci = (account_env(team_stack, user) for user in ("trainer", "reader", "ci"))

    # the teammate: the pipeline up to the report against the team server, the outputs pushed, the lock committed
    run("mnistgen", "team", "dvc-remote", "--user", "trainer", cwd=origin, env=trainer)
    run("dvc", "repro", "report", cwd=origin, env=trainer, timeout=1500)
    run("dvc", "push", "-q", cwd=origin, env=trainer)
    git("add", "-A", cwd=origin)
    git("commit", "-qm", "a full run", cwd=origin)
    logged = json.loads((origin / "models" / "vae" / "run.json").read_text())
    assert logged["tracking_uri"] == team_stack.tracking_uri

    # CI on the pull request, in a clean clone, as reader: pull, check, the gate's decision as a dry run
    git("clone", "-q", str(origin), str(clone), cwd=tmp_path)
    run("mnistgen", "team", "dvc-remote", "--user", "reader", cwd=clone, env=reader)
    checked = run("mnistgen", "pr", "check", cwd=clone, env=reader)
    assert "agree" in checked.stdout and "candidate not registered (the gate would promote it" in checked.stdout
    assert "dry run" in (clone / "artifacts" / "promotion.md").read_text()
    use_team_account(monkeypatch, team_stack, "admin")
    assert tracking.client().search_registered_models() == []  # the dry run registered nothing

    # a forged metric that dvc.lock records (dvc commit) disagrees with the run
    val = clone / "metrics" / "val" / "vae.json"
    measured = json.loads(val.read_text())
    val.write_text(json.dumps({**measured, "iwae_nll": measured["iwae_nll"] - 5}))
    run("dvc", "commit", "-q", "-f", "evaluate@vae", cwd=clone, env=reader)
    forged = run("mnistgen", "pr", "check", "--no-pull", cwd=clone, env=reader, check=False)
    assert forged.returncode == 1 and "metrics/val/vae.json: iwae_nll" in forged.stderr, forged.stderr
    git("checkout", "-q", "--", ".", cwd=clone)
    # code changed after the run: the lock no longer describes these outputs
    with open(clone / "src" / "mnistgen" / "models" / "vae.py", "a") as source:
        source.write("# changed after the run\n")
    stale = run("mnistgen", "pr", "check", "--no-pull", cwd=clone, env=reader, check=False)
    assert stale.returncode == 1 and "stage train@vae does not match dvc.lock" in stale.stderr, stale.stderr
    git("checkout", "-q", "--", ".", cwd=clone)

    # on merge, as ci: the same checks, then only the promote stage
    # (the venv not on PATH, as CI calls .venv/bin/mnistgen: the stage's `python` must still be the venv's)
    bare_path = os.pathsep.join(p for p in ci["PATH"].split(os.pathsep) if Path(p) != BIN)
    promoted = run(str(BIN / "mnistgen"), "pr", "promote", "--no-pull", cwd=clone, env={**ci, "PATH": bare_path})
    assert "promote v1 to champion" in promoted.stdout, promoted.stdout
    champion = tracking.client().get_model_version_by_alias("mnist-vae", "champion")
    assert champion.run_id == logged["run_id"] and champion.tags["grade"] == "default"
    history = [
        json.loads(v) for k, v in tracking.client().get_registered_model("mnist-vae").tags.items() if k.startswith("ledger.")
    ]
    assert [(h["who"], h["to"]) for h in history] == [("ci", champion.version)]
    assert json.loads((clone / "artifacts" / "promotion.json").read_text())["models"]["vae"]["decision"] == "promote"
    assert (clone / "artifacts" / "samples-vae.png").exists()
    assert "[samples-vae.png](samples-vae.png)" in (clone / "artifacts" / "promotion.md").read_text()

    # the trainer who logged the run may not move the alias itself
    use_team_account(monkeypatch, team_stack, "trainer")
    with pytest.raises(MlflowException) as denied:
        tracking.client().set_registered_model_alias("mnist-vae", "champion", champion.version)
    assert denied.value.get_http_status_code() == 403
