"""The paper-grade run: every stage of dvc.yaml, in its order, on params.yaml + a profile, without dvc or mlflow.

Made for a GPU box with torch but neither dvc nor mlflow, nor great_expectations or pydantic
(benchmarks/paper_wheels.sh fetches those as wheels to carry), in one call from the repository:

    MNIST_MIRROR=.gpu_mnist PYTHONPATH=src python -m mnistgen.commands.paper --profile params-paper.yaml --out $OUT --deadline 540

(`mnistgen paper ...` where the package is installed).

How it stands in for `dvc repro`:
- The commands are dvc.yaml's own, with `${paths.*}` and foreach's `${key}` filled in as DVC fills them
  (tests/test_paper.py checks every one against DVC's resolved stages).
- They run in a work folder (--work) whose params.yaml is the repo's with the profile merged in.
- Tracking is off (MNISTGEN_TRACKING=off): the library runs with no MLflow.
- The models' foreach stages run as one chain per model (train@m, then evaluate@m, as dvc.yaml's deps
  order them), --jobs chains side by side: one model's small convolutions leave most of a GPU idle.
- promote needs MLflow's registry, so in its place the gate's floors are checked as promote checks them
  for a first registration (gate.decide with no champion): reports/gate_floors.md and .json.
Every stage's log is in <work>/logs/; paper_run.json lists each stage's command, seconds and exit status.
With --out, the results (metrics, reports, figures, curves, logs, params) are packed into
<out>/paper_run.tar.gz, also when a stage failed or the deadline passed.

Exit status: 0 when every stage ran and every floor holds, 1 when a floor breaks, 2 when a stage failed
or the deadline passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from .. import gate
from ..config import GateParams, flatten, load_section, model_names
from ..profiles import merge

ROOT = Path(__file__).resolve().parents[3]  # the repository: its dvc.yaml, params and src/ (PYTHONPATH=src on a bare box)

PACKED = ["paper_run.json", "params.yaml", "README.md", "metrics", "reports", "evaluation", "curves", "logs"]


def stage_commands(dvc_yaml: Path, models: list[str], params: dict | None = None) -> list[tuple[str, str]]:
    """(stage name, command) for every stage of dvc.yaml in its order, foreach stages expanded over `models`;
    `${section.key}` values come from `params` (params.yaml's), as DVC takes them."""
    spec = yaml.safe_load(dvc_yaml.read_text())
    values = {
        **flatten(params or {}),
        **{f"paths.{k}": v for var in spec.get("vars", []) for k, v in var.get("paths", {}).items()},
    }
    commands = []
    for name, stage in spec["stages"].items():
        if "foreach" in stage:
            assert stage["foreach"] == "${models}", f"{name}: foreach over {stage['foreach']}, not the models"
            commands += [(f"{name}@{key}", fill(stage["do"]["cmd"], {**values, "key": key})) for key in models]
        else:
            commands.append((name, fill(stage["cmd"], values)))
    return commands


def fill(command: str, values: dict[str, str]) -> str:
    """Replace each ${name} as DVC does; a name this runner does not know is an error, not left in."""

    def value(match: re.Match) -> str:
        if match.group(1) not in values:
            raise KeyError(f"dvc.yaml: ${{{match.group(1)}}} is not a value this runner knows")
        return str(values[match.group(1)])

    return re.sub(r"\$\{\s*([\w.]+)\s*\}", value, " ".join(command.split()))


def plan(commands: list[tuple[str, str]], models: list[str]) -> list[list[list[tuple[str, str]]]]:
    """The run in dvc.yaml's order as steps, each a list of chains to run side by side. A stage alone is one
    chain of one stage; the foreach stages (train@m, evaluate@m) become one chain per model, where the first
    of them stands. promote is left out: the gate's floors stand in for it (check_floors)."""
    steps, chained = [], False
    for name, command in commands:
        if name == "promote":
            continue
        if "@" not in name:
            steps.append([[(name, command)]])
        elif not chained:
            steps.append([[(n, c) for n, c in commands if n.endswith(f"@{model}")] for model in models])
            chained = True
    return steps


def write_params(profile: Path | None, work: Path) -> None:
    """<work>/params.yaml: the repo's params with `profile` merged in (PyYAML: comments need not survive in this copy)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if profile is not None:
        merge(params, yaml.safe_load(profile.read_text()) or {})
    params["evaluate"]["evaluators"] = str(ROOT / params["evaluate"]["evaluators"])  # the pinned ruler, from the repository
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(ROOT / "README.md", work / "README.md")  # the report stage writes this run's results table into the copy


class Runner:
    """Runs stage commands in the work folder, each with its log, all under one deadline."""

    def __init__(self, work: Path, deadline: float, jobs: int):
        self.work, self.deadline = work, deadline
        self.results: list[dict] = []
        self.lock = threading.Lock()
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "MNISTGEN_TRACKING": "off",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        }
        # The chains share the cores: without this each process would start one torch thread per core.
        self.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
        if self.env.get("MNIST_MIRROR"):  # the stages run in the work folder: a relative mirror path is the caller's
            self.env["MNIST_MIRROR"] = str(Path(self.env["MNIST_MIRROR"]).resolve())

    def argv(self, command: str) -> list[str]:
        """The command's words, with `python` as this runner's interpreter (the box's `python` may be another one)."""
        return [sys.executable if word == "python" else word for word in command.split()]

    def skip(self, stage: str, why: str) -> None:
        self.record({"stage": stage, "seconds": 0.0, "status": f"not run ({why})"})

    def record(self, result: dict) -> None:
        with self.lock:
            self.results.append(result)
            print(f"{result['stage']:<22} {result['status']:<34} {result['seconds']:8.1f} s", flush=True)
            if result["status"].startswith(("failed", "killed")):
                print((self.work / "logs" / f"{result['stage']}.log").read_text()[-3000:], flush=True)

    def run(self, stage: str, command: str) -> bool:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.skip(stage, "deadline passed")
            return False
        started = time.monotonic()
        with open(self.work / "logs" / f"{stage}.log", "w") as log:
            process = subprocess.Popen(
                self.argv(command), cwd=self.work, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )  # its own process group: a kill takes its children too
            try:
                code = process.wait(timeout=left)
                status = "ok" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                status = "killed (deadline passed)"
        self.record({"stage": stage, "cmd": command, "seconds": round(time.monotonic() - started, 1), "status": status})
        return status == "ok"

    def chain(self, steps: list[tuple[str, str]]) -> bool:
        """Steps in order; after one fails, the rest are recorded as not run."""
        for i, (stage, command) in enumerate(steps):
            if not self.run(stage, command):
                for later, _ in steps[i + 1 :]:
                    self.skip(later, f"{stage} did not succeed")
                return False
        return True


def check_floors(work: Path) -> int:
    """promote's decision for a first registration: the floors alone. 0 when all hold, 1 when one breaks."""
    params_file = work / "params.yaml"
    decisions = []
    for name in model_names(params_file):
        metrics = json.loads((work / "metrics" / "val" / f"{name}.json").read_text())  # the gate reads validation
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        decisions.append(gate.decide(name, numeric, None, load_section(GateParams, f"gate.{name}", params_file)))
    code = 1 if any(d.breaks_floor for d in decisions) else 0
    note = (
        "Floors only: this run had no MLflow registry, so nothing was registered. Each decision is the one "
        "promote makes for a model with no champion yet.\n\n"
    )
    (work / "reports" / "gate_floors.md").write_text(note + gate.to_markdown(decisions, code))
    (work / "reports" / "gate_floors.json").write_text(json.dumps(gate.to_json(decisions, code), indent=2))
    for d in decisions:
        print(f"gate floors: {d.model}: {d.decision}" + (f" ({d.reason})" if d.breaks_floor else ""))
    return code


def pack(work: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "paper_run.tar.gz", "w:gz") as tar:
        for name in PACKED:
            if (work / name).exists():
                tar.add(work / name, arcname=name)
    for name in ("paper_run.json", "reports/comparison.md", "reports/gate_floors.md"):
        if (work / name).exists():
            shutil.copy(work / name, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mnistgen paper", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", type=Path, help="overrides merged onto params.yaml (e.g. params-paper.yaml)")
    parser.add_argument("--work", type=Path, default=ROOT / "artifacts" / "paper", help="folder the stages run in")
    parser.add_argument("--out", type=Path, help="pack the results into OUT/paper_run.tar.gz")
    parser.add_argument("--deadline", type=float, default=540.0, help="seconds for the whole run (default 540)")
    parser.add_argument("--jobs", type=int, default=0, help="model chains side by side (default: every model on CUDA, 1 on CPU)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    args.work.mkdir(parents=True, exist_ok=True)
    write_params(args.profile, args.work)
    models = model_names(args.work / "params.yaml")
    commands = stage_commands(ROOT / "dvc.yaml", models, yaml.safe_load((args.work / "params.yaml").read_text()))
    steps = plan(commands, models)
    if args.jobs <= 0:
        import torch

        args.jobs = len(models) if torch.cuda.is_available() else 1
    runner = Runner(args.work, started + args.deadline, args.jobs)
    print(
        f"paper run: {len(commands)} stages of dvc.yaml in {args.work}, profile {args.profile}, {args.jobs} model chain(s) at a time"
    )
    code = 2
    try:
        ok = True
        for chains in steps:
            if not ok:
                for name, _ in (step for chain in chains for step in chain):
                    runner.skip(name, "an earlier stage did not succeed")
                continue
            with ThreadPoolExecutor(min(args.jobs, len(chains))) as pool:
                ok = all(list(pool.map(runner.chain, chains)))  # list: every chain runs, even after one fails
        if ok:
            code = check_floors(args.work)
    finally:
        total = round(time.monotonic() - started, 1)
        summary = {"profile": str(args.profile), "jobs": args.jobs, "seconds": total, "exit_code": code, "stages": runner.results}
        (args.work / "paper_run.json").write_text(json.dumps(summary, indent=2))
        if args.out:
            pack(args.work, args.out)
        print(f"paper run: exit {code} after {total:.0f} s ({args.work}/paper_run.json)")
    return code


if __name__ == "__main__":
    sys.exit(main())
