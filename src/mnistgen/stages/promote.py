"""Stage promote (also a command): register each evaluated model and apply the promotion gate.

The gate reads the validation split only (metrics/val/ and the validation evidence); the test split is
the report's. Before a candidate is compared with the champion both must be measured alike: when the
champion's protocol fingerprint differs from the candidate's, the champion is loaded from the registry
by its alias and re-measured under the candidate's protocol with the evaluate stage's own code
(evaluation.measure); when that is impossible, promotion refuses. The comparison is paired (the same
validation images and sample noise, one bootstrap for both), and every move of @champion is written to
the model's ledger; each new version gets its model card as description.

Exit status: 0 when the gate decided (promoted, kept the champion, or inconclusive); 1 when a candidate
breaks a floor (a regression: CI fails; nothing is registered, no alias moves); 2 on an error such as an
unreachable registry or a champion that cannot be re-measured (the registry is left as it was).
Writes promotion.json and promotion.md either way.

Usage: python -m mnistgen.stages.promote --metrics metrics/val --models models --evaluation evaluation
       --evaluator models/evaluator --data data/prepared --out reports   (paths from dvc.yaml)
       [--dry-run]   decide and write the reports only: what `mnistgen pr check` shows on a pull request
"""

import argparse
import json
import re
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mnistgen import card, evaluation, gate, tracking
from mnistgen.config import EvaluateParams, GateParams, ParamsError, load_section, model_names
from mnistgen.models import load_trained
from mnistgen.registry import ArtifactsUnavailable, Registry, registered_name
from mnistgen.utils import StageError, atomic_write_text, pick_device, write_json

PROVENANCE = ("git_commit", "params_hash", "data_hash", "device", "torch_version", "grade", "family")


class ChampionUnmeasurable(StageError):
    """The champion was measured under another protocol and cannot be re-measured under the candidate's."""


@dataclass
class Candidate:
    name: str
    metrics: dict
    run: dict
    evidence: dict
    run_tags: dict[str, str] = field(default_factory=dict)  # the MLflow run's tags, read once the registry is open

    @property
    def numeric(self) -> dict[str, float]:
        return {k: v for k, v in self.metrics.items() if isinstance(v, (int, float))}


@dataclass
class Paths:
    metrics: Path
    models: Path
    evaluation: Path
    evaluator: Path
    data: Path


def load_candidate(name: str, paths: Paths) -> Candidate:
    metrics_file, run_file, evidence_file = (
        paths.metrics / f"{name}.json",
        paths.models / name / "run.json",
        paths.evaluation / name / evaluation.EVIDENCE,
    )
    try:
        measured = json.loads(metrics_file.read_text())
        evidence = torch.load(evidence_file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, json.JSONDecodeError) as err:
        raise StageError(
            f"{name}: cannot read the candidate's validation metrics or evidence ({err}); run `dvc repro evaluate@{name}`"
        ) from err
    if measured.get("split") != "val" or evidence.get("fingerprint") != measured.get("protocol"):
        raise StageError(
            f"{metrics_file}: not the validation measurement that {evidence_file} belongs to; run `dvc repro evaluate@{name}`"
        )
    run = tracking.read_run_file(run_file)
    if not run.get("run_id") or not run.get("model_uri"):
        raise StageError(f"{run_file}: the model was trained with tracking off; nothing to register")
    return Candidate(name, measured, run, evidence)


def stored_evidence(run_id: str) -> dict | None:
    """The validation evidence the champion's evaluate stage logged, or None when it cannot be read."""
    from mlflow.artifacts import download_artifacts

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = download_artifacts(run_id=run_id, artifact_path=f"evaluation/{evaluation.EVIDENCE}", dst_path=tmp)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - absent or unreadable: the champion is re-measured instead
        return None


def remeasure(name: str, version, paths: Paths, params: EvaluateParams) -> tuple[dict, dict]:
    """The champion's validation metrics and evidence under the candidate's protocol, with evaluation.measure."""
    from mlflow.artifacts import download_artifacts

    try:
        with tempfile.TemporaryDirectory() as tmp:
            download_artifacts(artifact_uri=f"models:/{name}/{version.version}", dst_path=tmp)
            weights = next(Path(tmp).rglob("weights.pt"))
            model = load_trained(weights.parent, pick_device("auto"))
            results, evidence = evaluation.measure(model, paths.evaluator, paths.data, params, model.device, splits=("val",))
    except Exception as err:  # noqa: BLE001 - whatever stops it, promotion refuses rather than guesses
        raise ChampionUnmeasurable(
            f"{name}: champion v{version.version} was measured under protocol {version.tags.get('protocol', 'unknown')} and "
            f"cannot be re-measured under the candidate's ({type(err).__name__}: {str(err)[:300]}); refusing to compare unlike numbers"
        ) from err
    return results["val"], evidence


def decide(name: str, c: Candidate, registry: Registry, rule: GateParams, paths: Paths, params: EvaluateParams) -> gate.Decision:
    """The gate's decision for one model; the champion re-measured under the candidate's protocol when its own differs."""
    registered = registered_name(name)
    version = registry.champion(registered)
    tags = (version.tags or {}) if version else {}
    grade = c.run_tags.get("grade", "unknown")
    decision = gate.settle(name, c.numeric, rule, grade, tags.get("grade"), version is not None, tracking.is_team_server())
    if decision is None:  # both measured alike, then compared pairwise
        champion_metrics, evidence, remeasured = Registry.version_metrics(version), None, False
        if tags.get("protocol") == c.metrics["protocol"]:
            evidence = stored_evidence(version.run_id)
        if evidence is None or evidence.get("fingerprint") != c.metrics["protocol"]:
            measured, evidence = remeasure(registered, version, paths, params)
            champion_metrics, remeasured = {k: v for k, v in measured.items() if isinstance(v, (int, float))}, True
        refs = evaluation.load_references(paths.evaluator, "val")
        comparisons = evaluation.paired_comparisons(gate.compared_metrics(rule), c.evidence, evidence, refs, params)
        decision = gate.decide(name, c.numeric, champion_metrics, rule, comparisons, grade, tags.get("grade"))
        decision.remeasured = remeasured
    elif version is not None:
        decision.champion = Registry.version_metrics(version)
    decision.champion_version = str(version.version) if version else None
    decision.champion_protocol = tags.get("protocol", "unknown") if version else None
    decision.candidate_protocol = c.metrics["protocol"]
    return decision


def promote(paths: Paths, registry_factory=Registry, dry_run: bool = False) -> tuple[list[gate.Decision], int]:
    """Decide for every model, then (unless `dry_run`, which only reads the registry) register and move aliases."""
    models = model_names()
    rules = {name: load_section(GateParams, f"gate.{name}") for name in models}
    params = load_section(EvaluateParams, "evaluate")
    candidates = {name: load_candidate(name, paths) for name in models}
    registry = registry_factory()
    for c in candidates.values():
        c.run_tags = registry.client.get_run(c.run["run_id"]).data.tags
    decisions = [decide(name, candidates[name], registry, rules[name], paths, params) for name in models]
    if any(d.breaks_floor for d in decisions):
        return decisions, 1  # a regression: register nothing, move no alias
    if dry_run:  # a pull request's preview: what the gate would do, with the registry untouched
        return decisions, 0
    cards = {}
    try:
        for d in decisions:
            c = candidates[d.model]
            registered = registered_name(d.model)
            tags = {k: c.run_tags.get(k, "unknown") for k in PROVENANCE}
            tags.update(
                {
                    "protocol": c.metrics["protocol"],
                    "protocol_json": json.dumps(c.evidence["protocol"], sort_keys=True),
                    "split": "val",
                    "gate_decision": d.decision,
                    **{k: v for k, v in c.metrics.items() if k.startswith("evaluator_hash")},
                }
            )
            d.candidate_version = registry.register(registered, c.run["model_uri"], c.run["run_id"], tags, c.numeric)
            registry.set_alias(registered, "challenger", d.candidate_version)
            if d.moves_champion and d.champion_version != d.candidate_version:
                evidence = f"{d.reason}; protocols candidate {d.candidate_protocol}, champion {d.champion_protocol or 'none'}"
                registry.move_champion(registered, d.candidate_version, "promote", evidence)
            cards[d.model] = card.model_card(
                d.model,
                tags["family"],
                d.candidate_version,
                tags["grade"],
                c.run["run_id"],
                tags,
                c.evidence["protocol"],
                c.metrics["protocol"],
                c.numeric,
                rules[d.model].training_noise,
                d.decision,
                d.reason,
            )
            registry.describe(registered, d.candidate_version, cards[d.model])
    except BaseException:
        registry.revert()
        raise
    for d in decisions:  # last: an artifact cannot be taken back, so it is written once the registry is settled
        registry.client.log_text(candidates[d.model].run["run_id"], cards[d.model], "model_card.md")
    return decisions, 0


def summary(d: gate.Decision) -> str:
    """One unambiguous line per model for a CI log, e.g. 'vae: keep champion v1 (candidate v2 declined)'."""
    keep = f"keep champion v{d.champion_version}" if d.champion_version else "leave @champion unset"
    if d.decision == gate.REJECT:
        return f"{d.model}: reject (breaks a floor; not registered)"
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    for flag in ("--metrics", "--models", "--evaluation", "--evaluator", "--data", "--out"):
        parser.add_argument(flag, type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="decide and write the reports; register nothing, move no alias")
    args = parser.parse_args(argv)
    decisions: list[gate.Decision] = []
    try:
        paths = Paths(args.metrics, args.models, args.evaluation, args.evaluator, args.data)
        decisions, code = promote(paths, dry_run=args.dry_run)
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
    atomic_write_text(args.out / "promotion.md", gate.to_markdown(decisions, code, dry_run=args.dry_run))
    write_json(args.out / "promotion.json", {**gate.to_json(decisions, code), "dry_run": args.dry_run})
    print(f"promote: exit {code}; {'; '.join(summary(d) for d in decisions) or 'no decision'} ({args.out}/promotion.md)")
    return code


if __name__ == "__main__":
    sys.exit(main())
