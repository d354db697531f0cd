"""Promotion: each model's candidate against its champion, decided by the gate on the validation split, then registered.

For each model, on its own (a model that cannot be decided is reported, and the others are decided):
1. The candidate's grade is earned (mnistgen.grades), and its validation protocol must be today's (the code, params,
   evaluators, data, device type and torch version here): a candidate measured under another is refused.
2. The gate settles it without a comparison where it can (a value that is not a number, a floor, a grade, no champion).
3. Otherwise both are measured alike. A candidate chosen among K > 1 trials (a sweep's best, a queue's best) and the
   champion are both measured again on fresh samples (an evaluation seed no choice has read), and the rule runs at
   alpha / K. Else the champion's stored evidence serves when its protocol is the candidate's, and the champion is
   re-measured under the candidate's protocol when it is not; a re-measure must end under the candidate's fingerprint.
4. The paired comparison (mnistgen.comparison) and the training noise of metrics/seeds go to the gate's rule.
Registration then records every decided candidate and moves @champion under the model's lock, only if @champion is
still the version the gate compared against (mnistgen.registry).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from . import card, comparison, evaluation, gate, grades, protocol, tracking
from .config import EvaluateParams, GateParams, GateSettings
from .models import FAMILIES, load_trained
from .registry import ChampionMoved, Registry, registered_name
from .utils import StageError, evaluation_device, git_show

PROVENANCE = ("git_commit", "params_hash", "data_hash", "device", "torch_version", "family", "recipe", "selected_from")


class Refused(StageError):
    """This model cannot be decided (the others can): one line says why."""


@dataclass
class Paths:
    metrics: Path
    models: Path
    evaluation: Path
    evaluator: Path
    data: Path
    seeds: Path


@dataclass
class Candidate:
    name: str
    metrics: dict
    run: dict
    evidence: dict
    run_tags: dict[str, str] = field(default_factory=dict)  # the MLflow run's tags, read once the registry is open

    @property
    def numeric(self) -> dict[str, float]:
        return {k: v for k, v in self.metrics.items() if isinstance(v, int | float)}

    @property
    def family(self) -> type:
        return FAMILIES[self.run_tags.get("family") or self.metrics.get("family", "")]


def load_candidate(name: str, paths: Paths) -> Candidate:
    metrics_file, run_file, evidence_file = (
        paths.metrics / f"{name}.json",
        paths.models / name / "run.json",
        paths.evaluation / name / evaluation.EVIDENCE,
    )
    try:
        measured = json.loads(metrics_file.read_text())
        evidence = torch.load(evidence_file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, json.JSONDecodeError, pickle.UnpicklingError) as err:
        raise Refused(
            f"{name}: cannot read the candidate's validation metrics or evidence ({err}); run `dvc repro evaluate@{name}`"
        ) from err
    if measured.get("split") != "val" or evidence.get("fingerprint") != measured.get("protocol"):
        raise Refused(
            f"{metrics_file}: not the validation measurement that {evidence_file} belongs to; run `dvc repro evaluate@{name}`"
        )
    run = tracking.read_run_file(run_file)
    if not run.get("run_id") or not run.get("model_uri"):
        raise Refused(f"{run_file}: the model was trained with tracking off; nothing to register")
    return Candidate(name, measured, run, evidence)


def training_noise(folder: Path, name: str, metrics: list[str]) -> tuple[dict[str, gate.TrainingNoise], dict]:
    """The training noise of each compared metric from metrics/seeds/<name>.json, and the whole record."""
    path = folder / f"{name}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise Refused(f"{path}: no training-noise record ({err}); run `mnistgen seeds --models {name}`") from err
    noise = record.get("noise", {})
    missing = [m for m in metrics if m not in noise]
    if missing:
        raise Refused(f"{path}: no training noise for {', '.join(missing)}; run `mnistgen seeds --models {name}`")
    return {m: gate.TrainingNoise.from_record(m, noise[m]) for m in metrics}, record


def noise_source(record: dict, c: Candidate, path: Path) -> str:
    n = max(int(v["seeds"]) for v in record["noise"].values())
    recipe = "this candidate's recipe" if record.get("recipe") == c.run_tags.get("recipe") else "another recipe (the seeded one)"
    measured = "the candidate's protocol" if record.get("protocol") == c.metrics["protocol"] else "another protocol"
    return f"{n} training seeds in {path}, of {recipe}, measured under {measured}"


def committed_profiles() -> dict[str, dict[str, Any] | None]:
    """The params each earnable grade stands for, as committed (git HEAD): params.yaml, and with params-paper.yaml."""
    default_text, paper_text = git_show("params.yaml"), git_show("params-paper.yaml")
    default = yaml.safe_load(default_text) if default_text else None
    if default is None or paper_text is None:
        return {"default": default, "paper": None}
    return {"default": default, "paper": grades.with_profile(default, yaml.safe_load(paper_text) or {})}


def trials_of(c: Candidate, client) -> int:
    """K: the trials this candidate was chosen among. Its run's `selected_from` (a sweep's best), or, for a run of a
    DVC experiment, the runs of the same model trained from the same baseline (a queue)."""
    trials = int(c.run_tags.get("selected_from") or 1)
    baseline = c.run_tags.get("dvc_exp_baseline_rev")
    if baseline:
        run = client.get_run(c.run["run_id"])
        siblings = client.search_runs(
            [run.info.experiment_id],
            f"tags.dvc_exp_baseline_rev = '{baseline}' and tags.model = '{c.name}' and tags.stage = 'train'",
        )
        trials = max(trials, len(siblings))
    return trials


def fresh_seed(run_id: str, p: EvaluateParams) -> int:
    """An evaluation seed no choice has read: derived from the candidate's run, never evaluate.seed itself."""
    seed = int(hashlib.sha256(run_id.encode()).hexdigest()[:8], 16) % 1_000_000 + 1_000
    return seed if seed != p.seed else seed + 1


def measure_val(model, paths: Paths, p: EvaluateParams, device) -> tuple[dict, dict]:
    results, evidence = evaluation.measure(model, paths.evaluator, paths.data, p, device, splits=("val",))
    return results["val"], comparison.on_cpu(evidence)


def remeasure_champion(name: str, version, paths: Paths, p: EvaluateParams, device) -> tuple[dict, dict]:
    """The champion's validation metrics and evidence under `p`, with the evaluate stage's code, on the CPU."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tracking.download_artifacts(f"models:/{name}/{version.version}", tmp)
            weights = next(Path(tmp).rglob("weights.pt"))
            return measure_val(load_trained(weights.parent, device), paths, p, device)
    except Exception as err:  # noqa: BLE001 - whatever stops it, this model is refused rather than guessed
        raise Refused(
            f"{name}: champion v{version.version} was measured under protocol {version.tags.get('protocol', 'unknown')} and "
            f"cannot be re-measured ({type(err).__name__}: {str(err)[:300]}); refusing to compare unlike numbers"
        ) from err


def stored_evidence(run_id: str) -> dict | None:
    """The validation evidence the champion's evaluate stage logged (on the CPU), or None when it cannot be read."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = tracking.download_artifacts(f"runs:/{run_id}/evaluation/{evaluation.EVIDENCE}", tmp)
            return comparison.on_cpu(torch.load(path, map_location="cpu", weights_only=True))
    except Exception:  # noqa: BLE001 - absent or unreadable: the champion is re-measured instead
        return None


@dataclass
class Context:
    """What every model's decision reads: the registry, the rules, the params and where things are."""

    registry: Registry
    paths: Paths
    settings: GateSettings
    params: EvaluateParams
    profiles: dict[str, dict[str, Any] | None]
    device: torch.device
    team: bool


def measured_alike(c: Candidate, version, ctx: Context, trials: int) -> tuple[dict, dict, dict | None, str]:
    """Candidate evidence, champion evidence, the champion's re-measured metrics (None: its registered ones serve),
    and what was measured again and why."""
    registered, tags = registered_name(c.name), version.tags or {}
    if trials > 1:  # a winner chosen on these samples: both sides measured again on samples nobody chose by
        fresh = ctx.params.model_copy(update={"seed": fresh_seed(c.run["run_id"], ctx.params)})
        model = load_trained(ctx.paths.models / c.name, ctx.device)
        _, candidate = measure_val(model, ctx.paths, fresh, ctx.device)
        champion_metrics, champion = remeasure_champion(registered, version, ctx.paths, fresh, ctx.device)
        why = f"both re-measured on fresh samples, evaluate.seed {fresh.seed}: the candidate was chosen among {trials} trials"
        expected = candidate["fingerprint"]
    else:
        candidate, champion_metrics, why = c.evidence, None, ""
        stored = stored_evidence(version.run_id) if tags.get("protocol") == c.metrics["protocol"] else None
        if stored is not None and stored.get("fingerprint") == c.metrics["protocol"]:
            champion = stored
        else:
            champion_metrics, champion = remeasure_champion(registered, version, ctx.paths, ctx.params, ctx.device)
            why = "champion re-measured under the candidate's protocol"
        expected = c.metrics["protocol"]
    if champion.get("fingerprint") != expected:
        raise Refused(
            f"{c.name}: the champion measured under protocol {champion.get('fingerprint')}, not the candidate's {expected}"
        )
    return candidate, champion, champion_metrics, why


def decide(c: Candidate, rule: GateParams, ctx: Context) -> gate.Decision:
    """The gate's decision for one model; raises Refused when it cannot be made."""
    name = c.name
    grade, graded = grades.earned(c.run_tags.get("grade"), c.run_tags.get("recipe"), ctx.profiles, name)
    today = protocol.fingerprint(
        evaluation.todays_protocol(ctx.params, ctx.paths.evaluator, ctx.paths.data, c.family, ctx.device)
    )
    if c.metrics["protocol"] != today:
        raise Refused(
            f"{name}: measured under protocol {c.metrics['protocol']}, not today's {today} (the measuring code, evaluate "
            f"params, evaluators, data, device type or torch differ); run `dvc repro evaluate@{name}` here"
        )
    version = ctx.registry.champion(registered_name(name))
    tags = (version.tags or {}) if version else {}
    decision = gate.settle(name, c.numeric, rule, grade, tags.get("grade"), version is not None, ctx.team)
    if decision is None:
        compared = gate.compared_metrics(rule)
        noise, record = training_noise(ctx.paths.seeds, name, compared)
        trials = trials_of(c, ctx.registry.client)
        candidate, champion, champion_metrics, why = measured_alike(c, version, ctx, trials)
        refs = {suffix: ref.feats for suffix, ref in evaluation.load_references(ctx.paths.evaluator, "val").items()}
        comparisons = comparison.paired_comparisons(compared, candidate, champion, refs, ctx.settings)
        if champion_metrics is None:
            champion_metrics = Registry.version_metrics(version)
        numeric = {k: v for k, v in champion_metrics.items() if isinstance(v, int | float)}
        decision = gate.decide(
            name, c.numeric, numeric, rule, comparisons, noise, ctx.settings.alpha, grade, tags.get("grade"), ctx.team, trials
        )
        decision.remeasured, decision.noise_source = why, noise_source(record, c, ctx.paths.seeds / f"{name}.json")
    elif version is not None:
        decision.champion = Registry.version_metrics(version)
    if grade != c.run_tags.get("grade"):
        decision.reason = f"graded {grade} ({graded}); {decision.reason}"
    decision.champion_version = str(version.version) if version else None
    decision.champion_protocol = tags.get("protocol", "unknown") if version else None
    decision.candidate_protocol = c.metrics["protocol"]
    return decision


def decide_each(candidates: dict[str, Candidate | Refused], rules: dict[str, GateParams], ctx: Context) -> list[gate.Decision]:
    """Every model's decision; a model that cannot be decided gets ERROR with one line, and the others go on."""
    decisions = []
    for name, c in candidates.items():
        try:
            if isinstance(c, Refused):
                raise c
            decisions.append(decide(c, rules[name], ctx))
        except (StageError, ValueError) as err:
            decisions.append(gate.failure(name, rules[name].primary, gate.ERROR, str(err)))
    return decisions


def register(
    decisions: list[gate.Decision], candidates: dict, rules: dict[str, GateParams], registry: Registry
) -> dict[str, str]:
    """Register every decided candidate, point @challenger at it, move @champion where the gate promotes (only if it is
    still the version compared against), and describe each version by its model card; returns the cards."""
    cards = {}
    for d in decisions:
        if d.failed:
            continue
        c = candidates[d.model]
        registered = registered_name(d.model)
        tags = {k: c.run_tags.get(k, "unknown") for k in PROVENANCE}
        tags.update(
            {
                "grade": d.candidate_grade or "unknown",  # earned (mnistgen.grades); the claim is grade_claimed
                "grade_claimed": c.run_tags.get("grade", "unknown"),
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
            try:
                registry.move_champion(registered, d.candidate_version, "promote", evidence, expected=d.champion_version)
            except ChampionMoved as err:
                d.decision, d.reason = gate.ERROR, str(err)
        cards[d.model] = card.model_card(d, tags, c.evidence["protocol"], c.run["run_id"], c.numeric)
        registry.describe(registered, d.candidate_version, cards[d.model])
    return cards


def context(registry: Registry, paths: Paths, settings: GateSettings, params: EvaluateParams) -> Context:
    return Context(registry, paths, settings, params, committed_profiles(), evaluation_device(), tracking.is_team_server())
