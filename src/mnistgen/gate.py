"""The promotion gate: pure decisions from validation metrics and paired comparisons, with a stated error rate.

Per model, in this order:
1. A non-finite value among the metrics the gate reads makes the model UNMEASURABLE (the champion stays).
2. Every floor must hold, else the candidate is a regression (REJECT: CI fails, nothing registered).
3. The grade: a run never takes @champion from a champion of a higher grade (smoke < sweep < experiment <
   default < paper), and in team mode a smoke run, or one without a grade, never becomes champion.
4. With no champion, the floors alone decide.
5. Otherwise candidate and champion, measured under one protocol, are compared pairwise on each compared metric
   (the primary, and its second-space twin with agree_in_both_spaces), and the rule below decides.

The rule, for one compared metric (docs/registry.md states it as a formula to check by hand):

    d     the candidate's improvement over the champion (positive = better), on the same validation images and
          sample noise
    σ_B   the standard deviation of d over the paired bootstrap's rounds: the evaluation noise of this comparison
    n, s  the number of training seeds of the default run in metrics/seeds, and the metric's standard deviation
          over them (each seed measured like the candidate)
    v     the mean paired-bootstrap variance of the differences between two of those seeds
    se²   = 2 s² - v + σ_B² (0 if negative): the variance of d between two training runs, 2 s², with the seeds'
          evaluation noise v swapped for this comparison's σ_B², so evaluation noise is counted once
    a     = α / K, K the trials the candidate was chosen among (1 unless it is a sweep's or a queue's best)
    T     = max(t(1 - a; n - 1) · se, z(1 - a) · σ_B): Student's t with n - 1 degrees of freedom, and the normal's
          quantile on the evaluation noise alone, which 2,000 rounds know well

PROMOTE when d > T for every compared metric; KEEP ("worse beyond the noise") when d < -T for one; otherwise
INCONCLUSIVE (the champion stays). For a candidate of the seeded recipe retrained with another seed, measured with
the seeds' evaluation noise (σ_B² = v), d / (sqrt(2)·s) follows Student's t with n - 1 degrees of freedom, so
P(d > T) <= P(d > t·sqrt(2)·s) = a: a false promotion happens at most α of the time (mnistgen.gate_rate simulates
it, and the test suite checks it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from scipy import stats

from .config import GRADES, Floor, GateParams

SECOND_SPACE = "_e2"  # suffix of a metric measured in the second evaluator's feature space

PROMOTE, KEEP, INCONCLUSIVE, REJECT = "promote", "keep champion", "inconclusive: keep champion", "reject"
UNMEASURABLE, ERROR = "unmeasurable: keep champion", "error: keep champion"  # this model only; the others are decided


@dataclass(frozen=True)
class Comparison:
    """Candidate minus champion on one metric, both measured under one protocol, and the paired bootstrap's standard
    deviation of that difference (its evaluation noise)."""

    metric: str
    difference: float
    eval_sd: float

    def improvement(self, higher_is_better: bool) -> float:
        """How much better the candidate is (positive = better)."""
        return self.difference if higher_is_better else -self.difference


@dataclass(frozen=True)
class TrainingNoise:
    """One metric's spread over the training seeds of one recipe, all measured under one protocol (metrics/seeds)."""

    metric: str
    seeds: int  # n
    seed_sd: float  # s: the metric's standard deviation over the seeds
    pair_eval_var: float  # v: the mean paired-bootstrap variance of the differences between two seeds

    @property
    def training_var(self) -> float:
        """σ_T²: the seeds' variance less the evaluation noise each seed's value carries (half a pair's)."""
        return max(0.0, self.seed_sd**2 - self.pair_eval_var / 2)

    @classmethod
    def from_record(cls, metric: str, record: dict[str, Any]) -> TrainingNoise:
        return cls(metric, int(record["seeds"]), float(record["seed_sd"]), float(record["pair_eval_var"]))


@dataclass(frozen=True)
class Verdict:
    """The rule applied to one compared metric: every number a reader needs to check it."""

    metric: str
    improvement: float  # d
    eval_sd: float  # σ_B
    training_sd: float  # σ_T = sqrt(max(0, s² - v/2)), shown; the rule uses se
    se: float
    seeds: int  # n
    level: float  # a = α / K
    t_quantile: float
    z_quantile: float
    outcome: str

    @property
    def threshold(self) -> float:
        return max(self.t_quantile * self.se, self.z_quantile * self.eval_sd)

    @property
    def interval(self) -> tuple[float, float]:
        """d ± T: promote when it lies above 0, worse beyond the noise when below."""
        return self.improvement - self.threshold, self.improvement + self.threshold

    def text(self) -> str:
        lo, hi = (x + 0.0 for x in self.interval)  # + 0.0: never a "-0" in the text
        said = {PROMOTE: "better beyond the noise", KEEP: "worse beyond the noise", INCONCLUSIVE: "the interval holds 0"}
        return (
            f"{self.metric}: better by {self.improvement + 0.0:.4g} [{lo:.4g}, {hi:.4g}] (threshold {self.threshold:.3g}; "
            f"se {self.se:.3g}, evaluation sd {self.eval_sd:.3g}, alpha {self.level:.3g}, {self.seeds} seeds): "
            f"{said[self.outcome]}"
        )


@lru_cache(maxsize=256)
def quantiles(level: float, seeds: int) -> tuple[float, float]:
    """t(1 - level; seeds - 1) and z(1 - level)."""
    if seeds < 2:
        raise ValueError(f"the training noise needs at least 2 seeds, got {seeds}")
    return float(stats.t.ppf(1 - level, seeds - 1)), float(stats.norm.ppf(1 - level))


def judge(comparison: Comparison, noise: TrainingNoise, alpha: float, higher_is_better: bool, trials: int = 1) -> Verdict:
    """PROMOTE, KEEP or INCONCLUSIVE for one metric by the module's rule; `trials`: how many the candidate was chosen among."""
    d = comparison.improvement(higher_is_better)
    se = math.sqrt(max(0.0, 2 * noise.seed_sd**2 - noise.pair_eval_var + comparison.eval_sd**2))
    level = alpha / max(1, trials)
    t, z = quantiles(level, noise.seeds)
    threshold = max(t * se, z * comparison.eval_sd)
    outcome = PROMOTE if d > threshold else (KEEP if d < -threshold else INCONCLUSIVE)
    return Verdict(comparison.metric, d, comparison.eval_sd, math.sqrt(noise.training_var), se, noise.seeds, level, t, z, outcome)


@dataclass
class FloorCheck:
    metric: str
    value: float | None
    limit: str
    ok: bool


@dataclass
class Decision:
    model: str
    decision: str
    reason: str
    primary: str
    candidate: dict[str, float]
    champion: dict[str, float] | None
    champion_version: str | None = None
    candidate_version: str | None = None
    floors: list[FloorCheck] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    candidate_protocol: str | None = None  # fingerprints: what each side's numbers were measured under
    champion_protocol: str | None = None  # the champion's as registered (before any re-measurement)
    remeasured: str = ""  # what was measured again before comparing, and why
    candidate_grade: str | None = None
    champion_grade: str | None = None
    alpha: float | None = None
    trials: int = 1  # the trials the candidate was chosen among
    noise_source: str = ""  # where the training noise came from

    @property
    def breaks_floor(self) -> bool:
        return self.decision == REJECT

    @property
    def moves_champion(self) -> bool:
        return self.decision == PROMOTE

    @property
    def failed(self) -> bool:
        """This model could not be decided (an error, or a value that is not a number); the others were."""
        return self.decision in (UNMEASURABLE, ERROR)


def failure(model: str, primary: str, kind: str, reason: str, candidate: dict[str, float] | None = None) -> Decision:
    """The decision for a model that cannot be decided: UNMEASURABLE or ERROR, the champion kept."""
    return Decision(model, kind, reason, primary, candidate or {}, None)


def check_floor(floor: Floor, metrics: dict[str, float]) -> FloorCheck:
    value = metrics.get(floor.metric)
    limits = []
    ok = value is not None
    if floor.min is not None:
        limits.append(f">= {floor.min:g}")
        ok = ok and value is not None and value >= floor.min
    if floor.max is not None:
        limits.append(f"<= {floor.max:g}")
        ok = ok and value is not None and value <= floor.max
    return FloorCheck(floor.metric, value, " and ".join(limits), bool(ok))


def compared_metrics(gate: GateParams) -> list[str]:
    """The metrics a paired comparison decides on: the primary, and its second-space twin when both spaces must agree."""
    return [gate.primary] + ([gate.primary + SECOND_SPACE] if gate.agree_in_both_spaces else [])


def grade_rank(grade: str | None) -> int:
    return GRADES.index(grade) if grade in GRADES else -1  # an unknown (older) grade ranks lowest


def not_finite(metrics: dict[str, float], keys: list[str]) -> list[str]:
    return [k for k in keys if k in metrics and not math.isfinite(metrics[k])]


def settle(
    model: str,
    candidate: dict[str, float],
    gate: GateParams,
    candidate_grade: str,
    champion_grade: str | None,
    has_champion: bool,
    team: bool = False,
) -> Decision | None:
    """The decision when no comparison is needed (a value that is not a number, a broken floor, a grade, no
    champion), else None."""
    floors = [check_floor(f, candidate) for f in gate.floors]
    decision = Decision(
        model,
        KEEP,
        "",
        gate.primary,
        candidate,
        None,
        floors=floors,
        candidate_grade=candidate_grade,
        champion_grade=champion_grade,
    )
    bad = not_finite(candidate, [gate.primary, *compared_metrics(gate), *(f.metric for f in gate.floors)])
    if bad:
        decision.decision = UNMEASURABLE
        decision.reason = f"the candidate's {', '.join(sorted(set(bad)))} is not a number"
        return decision
    broken = [f for f in floors if not f.ok]
    if broken:
        decision.decision = REJECT
        decision.reason = "breaks floor " + "; ".join(
            f"{f.metric} = {'missing' if f.value is None else _fmt(f.value)} (needs {f.limit})" for f in broken
        )
        return decision
    if gate.primary not in candidate:
        raise KeyError(f"gate.{model}.primary: metric {gate.primary!r} is not in the candidate's metrics")
    if team and candidate_grade not in GRADES:
        decision.decision = ERROR
        decision.reason = f"the candidate's run has no known grade ({candidate_grade!r}): refused on a team server"
        return decision
    if team and candidate_grade == "smoke":
        decision.reason = "a smoke run never becomes a team champion (grade smoke); registered, not promoted"
        return decision
    if not has_champion:
        decision.decision = PROMOTE
        decision.reason = "no champion yet; all floors hold"
        return decision
    if grade_rank(candidate_grade) < grade_rank(champion_grade):
        decision.reason = f"grade {candidate_grade} is below the champion's {champion_grade}: the champion stays"
        return decision
    return None


def decide(
    model: str,
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    gate: GateParams,
    comparisons: list[Comparison] | None = None,
    noise: dict[str, TrainingNoise] | None = None,
    alpha: float = 0.05,
    candidate_grade: str = "default",
    champion_grade: str | None = None,
    team: bool = False,
    trials: int = 1,
) -> Decision:
    """The gate's decision for one model (see the module's docstring); `comparisons` and `noise` (per compared
    metric) are needed when it comes to comparing."""
    settled = settle(model, candidate, gate, candidate_grade, champion_grade, champion is not None, team)
    if settled is not None:
        settled.champion = champion
        return settled
    if not comparisons:
        raise ValueError(f"{model}: a champion exists, so the gate needs the paired comparison of the two")
    missing = [c.metric for c in comparisons if c.metric not in (noise or {})]
    if missing:
        raise ValueError(f"{model}: no training noise for {', '.join(missing)}; run `mnistgen seeds --models {model}`")
    decision = Decision(
        model,
        KEEP,
        "",
        gate.primary,
        candidate,
        champion,
        candidate_grade=candidate_grade,
        champion_grade=champion_grade,
        alpha=alpha,
        trials=trials,
    )
    decision.floors = [check_floor(f, candidate) for f in gate.floors]
    bad = [c.metric for c in comparisons if not (math.isfinite(c.difference) and math.isfinite(c.eval_sd))]
    if bad:
        decision.decision = UNMEASURABLE
        decision.reason = f"the paired difference of {', '.join(bad)} is not a number"
        return decision
    assert noise is not None
    decision.verdicts = [judge(c, noise[c.metric], alpha, gate.higher_is_better, trials) for c in comparisons]
    outcomes = {v.outcome for v in decision.verdicts}
    decision.decision = PROMOTE if outcomes == {PROMOTE} else (KEEP if KEEP in outcomes else INCONCLUSIVE)
    decision.reason = "; ".join(v.text() for v in decision.verdicts)
    return decision


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def exit_code(decisions: list[Decision]) -> int:
    """1 when a candidate breaks a floor (a regression), else 2 when a model could not be decided, else 0."""
    if any(d.breaks_floor for d in decisions):
        return 1
    return 2 if any(d.failed for d in decisions) else 0


def to_markdown(decisions: list[Decision], exit_code: int, dry_run: bool = False) -> str:
    failed = ", ".join(d.model for d in decisions if d.failed)
    verdict_line = {
        0: "decided",
        1: "REGRESSION: a candidate breaks a floor; no alias moved",
        2: f"error ({failed or 'see below'}): {'the other models decided' if failed else 'no alias moved'}",
    }[exit_code]
    lines = [
        f"# Promotion gate{' (dry run: nothing registered, no alias moved)' if dry_run else ''}: {verdict_line}",
        "",
        "Decided on the validation split; the test split is the report's.",
        "",
        "| model | decision | candidate | champion | why |",
        "| --- | --- | --- | --- | --- |",
    ]
    for d in decisions:
        lines.append(
            f"| {d.model} | **{d.decision}** | v{d.candidate_version or '-'} | "
            f"{'v' + d.champion_version if d.champion_version else 'none'} | {d.reason} |"
        )
    for d in decisions:
        measured = (
            f"Protocols: candidate `{d.candidate_protocol}`, champion `{d.champion_protocol}`"
            + (f" ({d.remeasured})" if d.remeasured else "")
            + f". Grades: candidate {d.candidate_grade}, champion {d.champion_grade or '-'}."
        )
        lines += ["", f"## {d.model}: {d.decision}", "", f"{d.reason}. Primary metric: `{d.primary}`.", "", measured, ""]
        if d.verdicts:
            lines += [
                f"The rule: promote when d > T = max(t(1 - a; n - 1)·se, z(1 - a)·σ_B), se² = 2 s² - v + σ_B², "
                f"a = alpha / K; alpha {d.alpha}, K = {d.trials}; training noise {d.noise_source or 'from metrics/seeds'}.",
                "",
                "| metric | d (improvement) | σ_B (evaluation) | σ_T (training) | se | n | a | t | z | threshold T | d ± T | outcome |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for v in d.verdicts:
                lo, hi = v.interval
                lines.append(
                    f"| {v.metric} | {v.improvement:.4g} | {v.eval_sd:.3g} | {v.training_sd:.3g} | {v.se:.3g} | {v.seeds} | "
                    f"{v.level:.3g} | {v.t_quantile:.3g} | {v.z_quantile:.3g} | {v.threshold:.3g} | [{lo:.4g}, {hi:.4g}] | "
                    f"{v.outcome} |"
                )
            lines.append("")
        lines += ["| metric | candidate | champion | floor | ok |", "| --- | --- | --- | --- | --- |"]
        floors = {f.metric: f for f in d.floors}
        shown = [d.primary] + [m for m in (d.primary + SECOND_SPACE,) if m in d.candidate] + [m for m in floors if m != d.primary]
        for metric in shown:
            f = floors.get(metric)
            ok = "" if f is None else ("yes" if f.ok else "**NO**")
            champion = (d.champion or {}).get(metric)
            lines.append(f"| {metric} | {_fmt(d.candidate.get(metric))} | {_fmt(champion)} | {f.limit if f else ''} | {ok} |")
    return "\n".join(lines) + "\n"


def to_json(decisions: list[Decision], exit_code: int) -> dict[str, Any]:
    return {
        "exit_code": exit_code,
        "split": "val",
        "failed": [d.model for d in decisions if d.failed],
        "models": {
            d.model: {
                "decision": d.decision,
                "reason": d.reason,
                "primary": d.primary,
                "candidate_version": d.candidate_version,
                "champion_version": d.champion_version,
                "candidate_protocol": d.candidate_protocol,
                "champion_protocol": d.champion_protocol,
                "remeasured": d.remeasured,
                "candidate_grade": d.candidate_grade,
                "champion_grade": d.champion_grade,
                "alpha": d.alpha,
                "trials": d.trials,
                "noise_source": d.noise_source,
                "verdicts": [{**asdict(v), "threshold": v.threshold, "interval": list(v.interval)} for v in d.verdicts],
                "candidate": d.candidate,
                "champion": d.champion,
                "floors": [vars(f) for f in d.floors],
            }
            for d in decisions
        },
    }
