"""The promotion gate: pure decisions from validation metrics and paired comparisons.

Per model, in this order:
1. Every floor must hold, else the candidate is a regression (REJECT: CI fails, nothing registered).
2. The grade: a run never takes @champion from a champion of a higher grade (smoke < sweep < default
   < paper), and in team mode a smoke run never becomes champion at all.
3. With no champion, the floors alone decide.
4. Otherwise the candidate and the champion have been measured under one protocol (the promote stage
   re-measures the champion when the fingerprints differ) and compared pairwise: the same validation
   images, the same sample noise, one bootstrap resample applied to both. Each compared metric gives
   the candidate's improvement and its interval. PROMOTE when the whole interval lies beyond the
   metric's `training_noise` (the spread of the default run over training seeds); KEEP when it lies
   below; INCONCLUSIVE (the champion stays) when it straddles it. With agree_in_both_spaces the
   second evaluator's space (`<primary>_e2`) must say promote too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .config import GRADES, Floor, GateParams

SECOND_SPACE = "_e2"  # suffix of a metric measured in the second evaluator's feature space

PROMOTE, KEEP, INCONCLUSIVE, REJECT = "promote", "keep champion", "inconclusive: keep champion", "reject"


@dataclass
class FloorCheck:
    metric: str
    value: float | None
    limit: str
    ok: bool


@dataclass
class Comparison:
    """Candidate minus champion on one metric, both measured under the same protocol, with its paired-bootstrap interval."""

    metric: str
    difference: float
    lo: float
    hi: float

    def improvement(self, higher_is_better: bool) -> tuple[float, float, float]:
        """How much better the candidate is (positive = better): estimate, low and high end."""
        if higher_is_better:
            return self.difference, self.lo, self.hi
        return -self.difference, -self.hi, -self.lo


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
    comparisons: list[Comparison] = field(default_factory=list)
    candidate_protocol: str | None = None  # fingerprints: what each side's numbers were measured under
    champion_protocol: str | None = None  # the champion's as registered (before any re-measurement)
    remeasured: bool = False  # the champion was re-evaluated under the candidate's protocol
    candidate_grade: str | None = None
    champion_grade: str | None = None

    @property
    def breaks_floor(self) -> bool:
        return self.decision == REJECT

    @property
    def moves_champion(self) -> bool:
        return self.decision == PROMOTE


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


def verdict(comparison: Comparison, noise: float, higher_is_better: bool) -> tuple[str, str]:
    """PROMOTE, KEEP or INCONCLUSIVE for one metric, and why."""
    gain, lo, hi = (x + 0.0 for x in comparison.improvement(higher_is_better))  # + 0.0: never a "-0" in the text
    said = f"{comparison.metric}: better by {gain:.4g} [{lo:.4g}, {hi:.4g}] (paired bootstrap), training noise {noise:.4g}"
    if lo > noise:
        return PROMOTE, said + ": better beyond the noise"
    if hi <= noise:
        return KEEP, said + (": worse beyond the noise" if hi < -noise else ": not better beyond the noise")
    return INCONCLUSIVE, said + ": the interval straddles the noise"


def grade_rank(grade: str | None) -> int:
    return GRADES.index(grade) if grade in GRADES else -1  # an unknown (older) grade ranks lowest


def settle(
    model: str,
    candidate: dict[str, float],
    gate: GateParams,
    candidate_grade: str,
    champion_grade: str | None,
    has_champion: bool,
    team: bool = False,
) -> Decision | None:
    """The decision when no comparison is needed (a broken floor, a grade, no champion), else None."""
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
    broken = [f for f in floors if not f.ok]
    if broken:
        decision.decision = REJECT
        decision.reason = "breaks floor " + "; ".join(
            f"{f.metric} = {'missing' if f.value is None else _fmt(f.value)} (needs {f.limit})" for f in broken
        )
        return decision
    if gate.primary not in candidate:
        raise KeyError(f"gate.{model}.primary: metric {gate.primary!r} is not in the candidate's metrics")
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
    candidate_grade: str = "default",
    champion_grade: str | None = None,
    team: bool = False,
) -> Decision:
    """The gate's decision for one model (see the module's docstring); `comparisons` are needed when it comes to comparing."""
    settled = settle(model, candidate, gate, candidate_grade, champion_grade, champion is not None, team)
    if settled is not None:
        settled.champion = champion
        return settled
    if not comparisons:
        raise ValueError(f"{model}: a champion exists, so the gate needs the paired comparison of the two")
    decision = Decision(
        model, KEEP, "", gate.primary, candidate, champion, candidate_grade=candidate_grade, champion_grade=champion_grade
    )
    decision.floors = [check_floor(f, candidate) for f in gate.floors]
    verdicts = [verdict(c, gate.training_noise[c.metric], gate.higher_is_better) for c in comparisons]
    outcomes = {v for v, _ in verdicts}
    decision.comparisons = list(comparisons)
    decision.decision = PROMOTE if outcomes == {PROMOTE} else (KEEP if KEEP in outcomes else INCONCLUSIVE)
    decision.reason = "; ".join(why for _, why in verdicts)
    return decision


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def to_markdown(decisions: list[Decision], exit_code: int, dry_run: bool = False) -> str:
    verdict_line = {0: "decided", 1: "REGRESSION: a candidate breaks a floor; no alias moved", 2: "error; no alias moved"}[
        exit_code
    ]
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
            + (" (re-measured under the candidate's)" if d.remeasured else "")
            + f". Grades: candidate {d.candidate_grade}, champion {d.champion_grade or '-'}."
        )
        lines += ["", f"## {d.model}: {d.decision}", "", f"{d.reason}. Primary metric: `{d.primary}`.", "", measured, ""]
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
                "comparisons": [asdict(c) for c in d.comparisons],
                "candidate": d.candidate,
                "champion": d.champion,
                "floors": [vars(f) for f in d.floors],
            }
            for d in decisions
        },
    }
