"""Stage promote (also a command): register each evaluated model and apply the promotion gate.

Exit status: 0 when the gate decided (promoted or kept the champion); 1 when a candidate
breaks a floor (a regression: CI fails; nothing is registered, no alias moves); 2 on an
error such as an unreachable registry (the registry is left as it was).
Writes reports/promotion.json and reports/promotion.md either way.
"""
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mnistgen import gate, tracking  # noqa: E402
from mnistgen.config import GateParams, ParamsError, load_section  # noqa: E402
from mnistgen.utils import StageError, atomic_write_text, write_json  # noqa: E402

MODELS = ("ae", "vae", "gan", "wgan")
REPORTS = Path("reports")


def load_candidate(name: str) -> tuple[dict, dict]:
    metrics_file, run_file = Path("metrics") / f"{name}.json", Path("models") / name / "run.json"
    try:
        metrics = json.loads(metrics_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StageError(f"{metrics_file}: cannot read the candidate's metrics ({err}); run `dvc repro evaluate@{name}`") from err
    run = tracking.read_run_file(run_file)
    if not run.get("run_id") or not run.get("model_uri"):
        raise StageError(f"{run_file}: the model was trained with tracking off; nothing to register")
    return metrics, run


def promote(models=MODELS) -> tuple[list[gate.Decision], int]:
    gates = {name: load_section(GateParams, f"gate.{name}") for name in models}
    candidates = {name: load_candidate(name) for name in models}
    registry = tracking.Registry()
    decisions = []
    for name in models:
        registered = tracking.REGISTERED_NAMES[name]
        champion = registry.champion(registered)
        numeric = {k: v for k, v in candidates[name][0].items() if isinstance(v, (int, float))}
        decision = gate.decide(name, numeric, champion[1] if champion else None, gates[name])
        decision.champion_version = champion[0] if champion else None
        decisions.append(decision)
    if any(d.breaks_floor for d in decisions):
        return decisions, 1  # a regression: register nothing, move no alias
    try:
        for d in decisions:
            metrics, run = candidates[d.model]
            registered = tracking.REGISTERED_NAMES[d.model]
            run_tags = tracking.client().get_run(run["run_id"]).data.tags
            tags = {k: run_tags.get(k, "unknown") for k in ("git_commit", "params_hash", "device", "torch_version")}
            tags.update({"data_hash": tracking.data_hash(), "evaluator_hash": metrics.get("evaluator_hash", "unknown"), "gate_decision": d.decision})
            d.candidate_version = registry.register(registered, run["model_uri"], run["run_id"], tags, d.candidate)
            registry.set_alias(registered, "challenger", d.candidate_version)
            if d.decision == gate.PROMOTE:
                registry.set_alias(registered, "champion", d.candidate_version)
    except BaseException:
        registry.rollback()
        raise
    return decisions, 0


def main() -> int:
    decisions: list[gate.Decision] = []
    try:
        decisions, code = promote()
    except (StageError, ParamsError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except Exception as err:  # noqa: BLE001 - the registry or store failed: exit 2, registry rolled back
        traceback.print_exc()
        print(f"error: promotion failed, registry left as it was: {err}", file=sys.stderr)
        code = 2
    REPORTS.mkdir(exist_ok=True)
    atomic_write_text(REPORTS / "promotion.md", gate.to_markdown(decisions, code))
    write_json(REPORTS / "promotion.json", gate.to_json(decisions, code))
    summary = ", ".join(f"{d.model}: {d.decision}" + (f" v{d.candidate_version}" if d.candidate_version else "") for d in decisions)
    print(f"promote: exit {code}; {summary or 'no decision'} (reports/promotion.md)")
    return code


if __name__ == "__main__":
    sys.exit(main())
