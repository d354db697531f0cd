"""Stage promote (also a command): register each evaluated model and apply the promotion gate.

The gate reads the validation split only (metrics/val/, the validation evidence and metrics/seeds); the test split is
the report's. mnistgen.promotion decides each model on its own: today's protocol checked, the champion measured like
the candidate, a paired comparison, and the rule of mnistgen.gate, whose false-promotion rate is gate.alpha. Every move
of @champion goes to the model's ledger, under its lock; each new version gets its model card as description.

Exit status: 0 when the gate decided every model (promoted, kept the champion, or inconclusive); 1 when a candidate
breaks a floor (a regression: CI fails; nothing is registered, no alias moves); 2 when a model could not be decided
(its line says why; the other models were decided and registered) or on an error such as an unreachable registry
(the registry is left as it was). Writes promotion.json and promotion.md either way.

Usage: python -m mnistgen.stages.promote --metrics metrics/val --models models --evaluation evaluation
       --evaluator models/evaluator --data data/prepared --seeds metrics/seeds --out reports   (paths from dvc.yaml)
       [--dry-run]   decide and write the reports only: what `mnistgen pr check` shows on a pull request
"""

import argparse
import re
import sys
import traceback
from pathlib import Path

from mnistgen import gate, promotion, tracking
from mnistgen.config import EvaluateParams, GateParams, GateSettings, ParamsError, load_section, model_names, read_params, section
from mnistgen.registry import ArtifactsUnavailable, Registry
from mnistgen.utils import StageError, atomic_write_text, write_json

GATE_SETTINGS = ("alpha", "bootstrap", "bootstrap_seed")


def gate_rules(models: list[str]) -> tuple[GateSettings, dict[str, GateParams]]:
    """gate.alpha and the other shared settings, and gate.<model> for every model; any other key under gate is refused."""
    stray = [k for k in section(read_params(), "gate") if k not in models and k not in GATE_SETTINGS]
    if stray:
        raise ParamsError(f"params.yaml: gate.{stray[0]}: unknown key (neither a shared setting nor a model of `models`)")
    return load_section(GateSettings, "gate"), {name: load_section(GateParams, f"gate.{name}") for name in models}


def promote(paths: promotion.Paths, registry_factory=Registry, dry_run: bool = False) -> tuple[list[gate.Decision], int]:
    """Decide for every model, then (unless `dry_run`, which only reads the registry) register and move aliases."""
    models = model_names()
    settings, rules = gate_rules(models)
    params = load_section(EvaluateParams, "evaluate")
    candidates: dict = {}
    for name in models:
        try:
            candidates[name] = promotion.load_candidate(name, paths)
        except promotion.Refused as err:
            candidates[name] = err
    registry = registry_factory()
    for c in candidates.values():
        if isinstance(c, promotion.Candidate):
            c.run_tags = registry.client.get_run(c.run["run_id"]).data.tags
    decisions = promotion.decide_each(candidates, rules, promotion.context(registry, paths, settings, params))
    if any(d.breaks_floor for d in decisions):
        return decisions, 1  # a regression: register nothing, move no alias
    if dry_run:  # a pull request's preview: what the gate would do, with the registry untouched
        return decisions, gate.exit_code(decisions)
    try:
        cards = promotion.register(decisions, candidates, rules, registry)
    except BaseException:
        registry.revert()
        raise
    for model, text in cards.items():  # last: an artifact cannot be taken back, so it is written once the registry is settled
        registry.client.log_text(candidates[model].run["run_id"], text, "model_card.md")
    return decisions, gate.exit_code(decisions)


def summary(d: gate.Decision) -> str:
    """One unambiguous line per model for a CI log, e.g. 'vae: keep champion v1 (candidate v2 declined)'."""
    keep = f"keep champion v{d.champion_version}" if d.champion_version else "leave @champion unset"
    if d.decision == gate.REJECT:
        return f"{d.model}: reject (breaks a floor; not registered)"
    if d.failed:
        return f"{d.model}: {d.decision.split(':')[0]} ({d.reason})"
    if d.candidate_version is None:  # decided, but not registered: a dry run, or a promotion that stopped first
        return f"{d.model}: candidate not registered (the gate would {'promote it' if d.decision == gate.PROMOTE else keep})"
    if d.decision == gate.PROMOTE:
        return f"{d.model}: promote v{d.candidate_version} to champion" + (
            f" (was v{d.champion_version})" if d.champion_version else ""
        )
    if d.candidate_version == d.champion_version:
        return f"{d.model}: keep champion v{d.champion_version} (the candidate is that same run)"
    how = "inconclusive" if d.decision == gate.INCONCLUSIVE else "declined"
    return f"{d.model}: {keep} (candidate v{d.candidate_version} {how})"


def report_error(err: Exception) -> None:
    """One line for an error that stopped every model: the registry is left as it was."""
    if tracking.permission_denied(err):  # a read-only account: one line, no traceback
        endpoint = re.search(r"endpoint (\S+)", str(err))
        print(
            f"error: promotion refused: MLflow user '{tracking.current_user()}' may not register versions or move aliases "
            f"(403 on {endpoint.group(1) if endpoint else 'the registry'}; promotion needs the ci account); "
            "registry left as it was",
            file=sys.stderr,
        )
        return
    if not isinstance(err, ArtifactsUnavailable):
        traceback.print_exc()
    print(f"error: promotion failed, registry left as it was: {err}", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    for flag in ("--metrics", "--models", "--evaluation", "--evaluator", "--data", "--seeds", "--out"):
        parser.add_argument(flag, type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="decide and write the reports; register nothing, move no alias")
    args = parser.parse_args(argv)
    decisions: list[gate.Decision] = []
    try:
        paths = promotion.Paths(args.metrics, args.models, args.evaluation, args.evaluator, args.data, args.seeds)
        decisions, code = promote(paths, dry_run=args.dry_run)
    except (StageError, ParamsError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except Exception as err:  # noqa: BLE001 - the registry or store failed: exit 2, registry rolled back
        report_error(err)
        code = 2
    for d in decisions:
        if d.failed:
            print(f"error: {d.model}: {d.reason}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "promotion.md", gate.to_markdown(decisions, code, dry_run=args.dry_run))
    write_json(args.out / "promotion.json", {**gate.to_json(decisions, code), "dry_run": args.dry_run})
    print(f"promote: exit {code}; {'; '.join(summary(d) for d in decisions) or 'no decision'} ({args.out}/promotion.md)")
    return code


if __name__ == "__main__":
    sys.exit(main())
