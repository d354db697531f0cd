"""`mnistgen pr check|promote`: promote in team mode what a full run produced, never a model retrained in CI.

The flow (docs/team.md): a teammate runs the pipeline against the team server and the DVC remote as the
`trainer` account, up to the report (`dvc repro report`), pushes the outputs (`dvc push`), commits
dvc.lock and the metrics, and opens a pull request. CI then, in a clean checkout of that commit:

    mnistgen pr check     # on the pull request (any account that reads: reader)
    mnistgen pr promote   # on merge, as ci: the same checks, then only the promote stage

Both first `dvc pull` what dvc.lock names and check that
1. `dvc status` is clean for every stage but promote: the pulled outputs are the ones the lock names, made
   by this commit's code and params;
2. each model's metrics (metrics/val and metrics/test) are the values its MLflow run logged, under the
   same protocol fingerprint and grade, and the model the run logged is the pulled weights, byte for byte.
`check` then shows what the gate would decide (the promote stage's own command with --dry-run: nothing
registered, no alias moved), in <out>/promotion.md for the pull request. `promote` runs
`dvc repro --single-item --force promote`, which registers the version each pulled run logged.

Exit status: 0 when everything holds (and, for promote, the gate decided); 1 when a check fails or a
candidate breaks a floor (nothing is registered); 2 on an error (no server, no remote).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .. import figures, tracking
from ..config import ParamsError, RunParams, load_section, model_names
from ..utils import StageError, sha256_file
from . import smoke

PROMOTE_STAGE = "promote"  # the one stage CI runs, and the one whose lock entry a pull request may leave stale
METRICS, MODELS = Path("metrics"), Path("models")  # dvc.yaml's layout: metrics/<split>/<m>.json, models/<m>/
SPLITS = ("val", "test")


def dvc(*args: str, capture: bool = True) -> subprocess.CompletedProcess:
    """A dvc command here, with this environment's bin first on PATH (the stage commands' `python`), on the
    tracking server of the environment."""
    return smoke.dvc(*args, cwd=Path.cwd(), capture=capture, keep_tracking_uri=True)


def pull() -> None:
    result = dvc("pull", "-q")
    if result.returncode != 0:
        raise StageError(f"dvc pull failed: {(result.stderr or result.stdout).strip()[-500:]}")


def lock_problems(status: dict) -> list[str]:
    """The stages of `dvc status --json` that differ from dvc.lock, but promote: CI runs that one itself."""
    return [
        f"dvc status: stage {stage} does not match dvc.lock ({json.dumps(changes)[:300]}); run `dvc repro report`, "
        "`dvc push` and commit dvc.lock"
        for stage, changes in sorted(status.items())
        if stage != PROMOTE_STAGE and not stage.endswith(f":{PROMOTE_STAGE}")
    ]


def check_lock() -> list[str]:
    result = dvc("status", "--json")
    if result.returncode != 0:
        raise StageError(f"dvc status failed: {result.stderr.strip()[-500:]}")
    return lock_problems(json.loads(result.stdout or "{}"))


def metric_problems(name: str, files: dict[str, dict], logged: dict[str, float]) -> list[str]:
    """Each numeric value of metrics/<split>/<name>.json against the run's `<split>_<key>` metric."""
    problems = []
    for split, measured in files.items():
        for key, value in measured.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            got = logged.get(f"{split}_{key}")
            if got is None or not math.isclose(got, value, rel_tol=1e-9, abs_tol=1e-12):
                problems.append(
                    f"{METRICS / split / name}.json: {key} is {value}, but the run logged "
                    f"{'nothing' if got is None else got} as {split}_{key}"
                )
    return problems


def logged_weights_sha256(model_uri: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        tracking.download_artifacts(model_uri, tmp)
        found = list(Path(tmp).rglob("weights.pt"))
        if len(found) != 1:
            raise StageError(f"{model_uri}: the logged model holds {len(found)} weights.pt files, not one")
        return sha256_file(found[0])


def run_problems(name: str, grade: str) -> list[str]:
    """Where models/<name>/ and metrics/*/<name>.json disagree with the MLflow run that models/<name>/run.json names."""
    run_file = MODELS / name / "run.json"
    record = tracking.read_run_file(run_file)
    if not record.get("run_id") or not record.get("model_uri"):
        return [f"{run_file}: trained with tracking off; nothing was logged to promote"]
    if record.get("tracking_uri") != tracking.tracking_uri():
        return [f"{run_file}: the run was logged to {record.get('tracking_uri')}, not to {tracking.tracking_uri()}"]
    try:
        run = tracking.client().get_run(record["run_id"])
    except Exception as err:  # noqa: BLE001 - gone, or never on this server
        if tracking.not_found(err):
            return [f"{run_file}: run {record['run_id']} is not on {tracking.tracking_uri()}"]
        raise
    files = {}
    for split in SPLITS:
        path = METRICS / split / f"{name}.json"
        try:
            files[split] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            return [f"{path}: cannot read it ({err})"]
    problems = metric_problems(name, files, run.data.metrics)
    tags = run.data.tags
    if run.info.status != "FINISHED":
        problems.append(f"{run_file}: run {record['run_id']} is {run.info.status}, not FINISHED")
    if tags.get("protocol") != files["val"].get("protocol"):
        problems.append(
            f"{METRICS / 'val' / name}.json: protocol {files['val'].get('protocol')}, but the run is tagged {tags.get('protocol')}"
        )
    if tags.get("grade") != grade:
        problems.append(f"{run_file}: the run is graded {tags.get('grade')}, but params.yaml's train.grade is {grade}")
    weights = MODELS / name / "weights.pt"
    if sha256_file(weights) != logged_weights_sha256(record["model_uri"]):
        problems.append(f"{weights}: not the weights the run logged as {record['model_uri']}")
    return problems


def check() -> list[str]:
    """Every problem found, lock first (the runs' checks read the pulled files)."""
    if not tracking.is_team_server():
        raise StageError("MLFLOW_TRACKING_URI is not a tracking server: the pull-request flow checks runs logged to the team's")
    tracking.check_reachable()
    problems = check_lock()
    if problems:
        return problems
    grade = load_section(RunParams, "train").grade
    for name in model_names():
        problems += run_problems(name, grade)
    return problems


def promote_command(dry_run: bool, out: Path) -> list[str]:
    """The promote stage's own command, as dvc.yaml resolves it, with --dry-run and another --out."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        cmd = repo.stage.collect(PROMOTE_STAGE)[0].cmd
    argv = shlex.split(cmd)
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv + ["--out", str(out)] + (["--dry-run"] if dry_run else [])


def champion_grid(model: str, version: str | None, folder: Path) -> Path | None:
    """The sample grid the champion's evaluate stage logged (evaluation/samples.png of its run), or None."""
    if version is None:
        return None
    try:
        run_id = tracking.client().get_model_version(f"mnist-{model}", version).run_id
        return Path(tracking.download_artifacts(f"runs:/{run_id}/evaluation/samples.png", folder))
    except Exception:  # noqa: BLE001 - gone or unreadable: the figure says "no sample grid"
        return None


def show_samples(out: Path) -> None:
    """Per model, the candidate's sample grid beside the champion's (samples-<model>.png in `out`, kept with CI's
    artifacts), linked from the gate's summary, promotion.md."""
    decided = json.loads((out / "promotion.json").read_text()).get("models", {})
    links = ["", "## Samples: candidate beside champion", ""]
    for model, d in decided.items():
        with tempfile.TemporaryDirectory() as tmp:
            champion = d.get("champion_version")
            grids = {
                "candidate (this pull request)": Path("evaluation") / model / "samples.png",
                f"champion v{champion}" if champion else "no champion yet": champion_grid(model, champion, Path(tmp)),
            }
            figure = figures.side_by_side(grids, out / f"samples-{model}.png", f"{model}: {d['decision']}")
        links.append(f"- {model}: [{figure.name}]({figure.name}) ({d['decision']})")
    with open(out / "promotion.md", "a") as summary:
        summary.write("\n".join(links) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mnistgen pr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["check", "promote"])
    parser.add_argument("--no-pull", action="store_true", help="the outputs are pulled already")
    parser.add_argument("--out", type=Path, default=Path("artifacts"), help="where promotion.md goes (CI's summary)")
    args = parser.parse_args(argv)
    try:
        if not args.no_pull:
            pull()
        problems = check()
    except (StageError, ParamsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print(f"pr: {len(problems)} check(s) failed; nothing promoted", file=sys.stderr)
        return 1
    print(f"pr: dvc.lock, the pulled outputs and the logged runs of {', '.join(model_names())} agree")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "check":
        code = subprocess.call(promote_command(True, args.out))
        show_samples(args.out)
        return code
    # only the promote stage, as the account in the environment (ci); its exit status is in promotion.json
    reports = [Path("reports") / name for name in ("promotion.json", "promotion.md")]
    for path in reports:
        path.unlink(missing_ok=True)  # the pull request's own copies: never mistaken for this promotion's
    dvc("repro", "--single-item", "--force", PROMOTE_STAGE, capture=False)
    if not reports[0].exists():
        print("error: the promote stage did not run (see dvc's output above)", file=sys.stderr)
        return 2
    for path in reports:
        shutil.copy(path, args.out / path.name)
    show_samples(args.out)
    return int(json.loads(reports[0].read_text())["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
