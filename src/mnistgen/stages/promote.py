"""Stage promote (also a command): register each evaluated model and apply the promotion gate.

Exit status: 0 when the gate decided (promoted or kept the champion); 1 when a candidate
breaks a floor (a regression: CI fails; nothing is registered, no alias moves); 2 on an
error such as an unreachable registry (the registry is left as it was).
Writes promotion.json and promotion.md either way.

Usage: python -m mnistgen.stages.promote --metrics metrics --models models --out reports   (paths from dvc.yaml)
"""

import argparse
import json
import re
import sys
import traceback
from pathlib import Path

from mnistgen import gate, tracking
from mnistgen.config import GateParams, ParamsError, load_section, model_names
from mnistgen.registry import ArtifactsUnavailable, Registry, registered_name
from mnistgen.utils import StageError, atomic_write_text, write_json


def load_candidate(name: str, metrics_dir: Path, models_dir: Path) -> tuple[dict, dict]:
    metrics_file, run_file = metrics_dir / f"{name}.json", models_dir / name / "run.json"
    try:
        metrics = json.loads(metrics_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StageError(f"{metrics_file}: cannot read the candidate's metrics ({err}); run `dvc repro evaluate@{name}`") from err
    run = tracking.read_run_file(run_file)
    if not run.get("run_id") or not run.get("model_uri"):
        raise StageError(f"{run_file}: the model was trained with tracking off; nothing to register")
    return metrics, run


def promote(metrics_dir: Path, models_dir: Path, registry_factory=Registry) -> tuple[list[gate.Decision], int]:
    models = model_names()
    gates = {name: load_section(GateParams, f"gate.{name}") for name in models}
    candidates = {name: load_candidate(name, metrics_dir, models_dir) for name in models}
    registry = registry_factory()
    decisions = []
    for name in models:
        champion = registry.champion(registered_name(name))
        numeric = {k: v for k, v in candidates[name][0].items() if isinstance(v, (int, float))}
        decision = gate.decide(name, numeric, champion[1] if champion else None, gates[name])
        decision.champion_version = champion[0] if champion else None
        decisions.append(decision)
    if any(d.breaks_floor for d in decisions):
        return decisions, 1  # a regression: register nothing, move no alias
    try:
        for d in decisions:
            metrics, run = candidates[d.model]
            registered = registered_name(d.model)
            run_tags = registry.client.get_run(run["run_id"]).data.tags
            tags = {k: run_tags.get(k, "unknown") for k in ("git_commit", "params_hash", "device", "torch_version")}
            tags.update(
                {
                    "data_hash": tracking.data_hash(),
                    "evaluator_hash": metrics.get("evaluator_hash", "unknown"),
                    "gate_decision": d.decision,
                }
            )
            d.candidate_version = registry.register(registered, run["model_uri"], run["run_id"], tags, d.candidate)
            registry.set_alias(registered, "challenger", d.candidate_version)
            if d.decision == gate.PROMOTE:
                registry.set_alias(registered, "champion", d.candidate_version)
    except BaseException:
        registry.rollback()
        raise
    return decisions, 0


def summary(d: gate.Decision) -> str:
    """One unambiguous line per model for a CI log, e.g. 'vae: keep champion v1 (candidate v2 declined)'."""
    if d.decision != gate.REJECT and d.candidate_version is None:  # decided, but the promotion stopped before registering it
        was = f"champion v{d.champion_version}" if d.champion_version else "no champion"
        return f"{d.model}: candidate not registered (the gate would {'promote it' if d.decision == gate.PROMOTE else 'keep the champion'}; {was} unchanged)"
    if d.decision == gate.PROMOTE:
        return f"{d.model}: promote v{d.candidate_version} to champion" + (
            f" (was v{d.champion_version})" if d.champion_version else ""
        )
    if d.decision == gate.KEEP and d.candidate_version == d.champion_version:
        return f"{d.model}: keep champion v{d.champion_version} (the candidate is that same run)"
    if d.decision == gate.KEEP:
        return f"{d.model}: keep champion v{d.champion_version} (candidate v{d.candidate_version} declined)"
    return f"{d.model}: reject (breaks a floor; not registered)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    for flag in ("--metrics", "--models", "--out"):
        parser.add_argument(flag, type=Path, required=True)
    args = parser.parse_args(argv)
    decisions: list[gate.Decision] = []
    try:
        decisions, code = promote(args.metrics, args.models)
    except (StageError, ParamsError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except Exception as err:  # noqa: BLE001 - the registry or store failed: exit 2, registry rolled back
        if tracking.permission_denied(err):  # a read-only account: one line, no traceback
            endpoint = re.search(r"endpoint (\S+)", str(err))
            print(
                f"error: promotion refused: MLflow user '{tracking.current_user()}' may not register versions or move aliases "
                f"(403 on {endpoint.group(1) if endpoint else 'the registry'}; promotion needs the ci account); "
                "registry left as it was",
                file=sys.stderr,
            )
        elif isinstance(err, ArtifactsUnavailable):
            print(f"error: promotion failed, registry left as it was: {err}", file=sys.stderr)
        else:
            traceback.print_exc()
            print(f"error: promotion failed, registry left as it was: {err}", file=sys.stderr)
        code = 2
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "promotion.md", gate.to_markdown(decisions, code))
    write_json(args.out / "promotion.json", gate.to_json(decisions, code))
    print(f"promote: exit {code}; {'; '.join(summary(d) for d in decisions) or 'no decision'} ({args.out}/promotion.md)")
    return code


if __name__ == "__main__":
    sys.exit(main())
