"""Run the whole pipeline (`dvc repro`) on a small real-MNIST subset in a scratch copy of the repo.

CI's smoke run and the end-to-end test both use this. The copy gets its own git repo, its own
MLflow store (sqlite:///mlflow.db inside the copy) and params.yaml with params-smoke.yaml
applied (comments kept). A gate regression (promote exits 1) fails `dvc repro`, and so this script.

Usage: [MNIST_MIRROR=<folder of the MNIST files>] mnistgen smoke [--workdir DIR] [--overrides FILE] [--keep-tracking-uri] [--target STAGE]

With --keep-tracking-uri the stages track and register on MLFLOW_TRACKING_URI (the team server;
credentials from MLFLOW_TRACKING_USERNAME/PASSWORD) instead of the copy's embedded store. With
--target report it stops before promote, as a teammate's run for a pull request does (docs/team.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..profiles import apply_profile

ROOT = Path(__file__).resolve().parents[3]  # the repository of an editable install
OUTPUTS = (
    "dvc.lock",
    "metrics/",
    "models/",
    "reports/",
    "data/",
    "curves/",
    "evaluation/",
)  # produced by the pipeline: not copied
RECORDS = (
    "metrics/seeds/",
)  # committed measurements the pipeline reads (the report shows them only beside figures measured alike)


def copy_repo(dst: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    for rel in listed.stdout.splitlines():
        if rel.startswith(OUTPUTS) and not rel.startswith(RECORDS) and not rel.endswith(".gitignore"):
            continue
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def make_workspace(workdir: Path, overrides: Path | None) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    copy_repo(workdir)
    if overrides:
        apply_profile(overrides, workdir / "params.yaml", workdir / "params.yaml")
    git("init", "-q", cwd=workdir)
    git("add", "-A", cwd=workdir)
    git("-c", "user.name=smoke", "-c", "user.email=smoke@localhost", "commit", "-qm", "smoke workspace", cwd=workdir)
    return workdir


def dvc(*args: str, cwd: Path, capture: bool = False, keep_tracking_uri: bool = False) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("dvc")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if not keep_tracking_uri:
        env.pop("MLFLOW_TRACKING_URI", None)  # the embedded default store inside the workspace
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, text=True, capture_output=capture)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mnistgen smoke", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--overrides", type=Path, default=ROOT / "params-smoke.yaml")
    parser.add_argument(
        "--keep-tracking-uri",
        action="store_true",
        help="track and register on MLFLOW_TRACKING_URI (a team server; with MLFLOW_TRACKING_USERNAME/PASSWORD) "
        "instead of the workspace's own embedded store",
    )
    parser.add_argument("--target", default=None, help="reproduce this stage and what it depends on only (dvc repro TARGET)")
    args = parser.parse_args(argv)
    if args.keep_tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        parser.error("--keep-tracking-uri needs MLFLOW_TRACKING_URI")
    workdir = make_workspace(args.workdir or Path(tempfile.mkdtemp(prefix="mnistgen-smoke-")), args.overrides)
    store = os.environ["MLFLOW_TRACKING_URI"] if args.keep_tracking_uri else "its own sqlite:///mlflow.db"
    print(f"smoke: workspace {workdir}, MLflow store {store}")
    started = time.perf_counter()
    targets = [args.target] if args.target else []
    first = dvc("repro", *targets, cwd=workdir, keep_tracking_uri=args.keep_tracking_uri)
    elapsed = time.perf_counter() - started
    promotion = workdir / "reports" / "promotion.md"
    if promotion.exists():
        print(promotion.read_text())
        (ROOT / "artifacts").mkdir(exist_ok=True)
        shutil.copy(promotion, ROOT / "artifacts" / "promotion.md")  # CI shows it as the job summary
    if first.returncode != 0:
        print(f"smoke: dvc repro failed (exit {first.returncode}) after {elapsed:.0f} s", file=sys.stderr)
        return 1
    started = time.perf_counter()
    second = dvc("repro", *targets, cwd=workdir, capture=True, keep_tracking_uri=args.keep_tracking_uri)
    if second.returncode != 0 or "up to date" not in second.stdout:
        print(f"smoke: a second dvc repro was not a no-op:\n{second.stdout}{second.stderr}", file=sys.stderr)
        return 1
    print(f"smoke: dvc repro passed in {elapsed:.0f} s; a second dvc repro did nothing ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
