"""The promotion gate: pure decisions from metrics (the registry side lives in tracking.py).

Per model: every floor must hold (else the candidate is a regression and CI fails);
with no champion the floors alone decide; otherwise the candidate must beat the
champion on the primary metric by more than min_improvement + tolerance, or the
champion stays. The tolerance absorbs run-to-run noise: a fixed number, or `band`: the
two noise bands' facing half-widths combined (the candidate's half towards the champion
plus the champion's half towards the candidate, so with min_improvement 0 the bands must
not overlap). With agree_in_both_spaces the same must hold for the metric in the second
evaluator's feature space (`<primary>_e2`) whenever both versions have it; every reason
says what each space says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import Floor, GateParams

SECOND_SPACE = "_e2"  # suffix of a metric measured in the second evaluator's feature space
Z95 = 1.959964  # a band from a standard error: estimate +- 1.96 standard errors

PROMOTE, KEEP, REJECT = "promote", "keep champion", "reject"


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

    @property
    def breaks_floor(self) -> bool:
        return self.decision == REJECT


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


def improvement(candidate: float, champion: float, higher_is_better: bool) -> float:
    """How much better the candidate is (positive = better), in the metric's own units."""
    return candidate - champion if higher_is_better else champion - candidate


def band_of(metrics: dict[str, float], key: str) -> tuple[float, float] | None:
    """The noise band of `key`: its bootstrap interval `<key>_lo`..`<key>_hi`, else +-1.96 standard errors."""
    if f"{key}_lo" in metrics and f"{key}_hi" in metrics:
        return metrics[f"{key}_lo"], metrics[f"{key}_hi"]
    if f"{key}_stderr" in metrics and key in metrics:
        return metrics[key] - Z95 * metrics[f"{key}_stderr"], metrics[key] + Z95 * metrics[f"{key}_stderr"]
    return None


def required_gain(key: str, candidate: dict[str, float], champion: dict[str, float], gate: GateParams) -> tuple[float, str]:
    """How much better the candidate must be on `key`, and how that number was made."""
    if gate.tolerance != "band":
        return gate.min_improvement + gate.tolerance, f"min_improvement {gate.min_improvement:g} + tolerance {gate.tolerance:g}"
    mine, theirs = band_of(candidate, key), band_of(champion, key)
    if mine is None:
        raise KeyError(f"gate tolerance 'band': the candidate has no band for {key!r} ({key}_lo/_hi or {key}_stderr)")
    # the half of each band that faces the other value when the candidate is the better one
    mine_half = candidate[key] - mine[0] if gate.higher_is_better else mine[1] - candidate[key]
    if theirs is None:  # a champion registered before bands existed: assume its noise is the candidate's
        theirs_half, whose = mine_half, "the candidate's half-width twice (the champion has no band)"
    else:
        theirs_half = theirs[1] - champion[key] if gate.higher_is_better else champion[key] - theirs[0]
        whose = "the facing band half-widths"
    return gate.min_improvement + mine_half + theirs_half, f"min_improvement {gate.min_improvement:g} + {whose}"


def decide(model: str, candidate: dict[str, float], champion: dict[str, float] | None, gate: GateParams) -> Decision:
    floors = [check_floor(f, candidate) for f in gate.floors]
    decision = Decision(model, KEEP, "", gate.primary, candidate, champion, floors=floors)
    broken = [f for f in floors if not f.ok]
    if broken:
        decision.decision = REJECT
        decision.reason = "breaks floor " + "; ".join(
            f"{f.metric} = {'missing' if f.value is None else _fmt(f.value)} (needs {f.limit})" for f in broken
        )
        return decision
    if gate.primary not in candidate:
        raise KeyError(f"gate.{model}.primary: metric {gate.primary!r} is not in the candidate's metrics")
    if champion is None or gate.primary not in champion:
        decision.decision = PROMOTE
        decision.reason = "no champion yet; all floors hold"
        return decision
    direction = "higher" if gate.higher_is_better else "lower"
    keys = [gate.primary]
    second = gate.primary + SECOND_SPACE
    note = ""
    if gate.agree_in_both_spaces:
        if second in candidate and second in champion:
            keys.append(second)
        else:
            note = f"; {second} not measured for {'the champion' if second in candidate else 'the candidate'}: decided in one feature space"
    parts, wins = [], []
    for key in keys:
        gain = improvement(candidate[key], champion[key], gate.higher_is_better)
        needed, how = required_gain(key, candidate, champion, gate)
        wins.append(gain > needed)
        parts.append(
            f"{key} better by {gain:.4g} ({direction} is better), {'more' if wins[-1] else 'not more'} than the "
            f"{needed:.4g} required ({how})"
        )
    decision.decision = PROMOTE if all(wins) else KEEP
    spaces = ""
    if len(keys) == 2:
        spaces = (
            "; holds in both feature spaces"
            if all(wins)
            else ("; holds in neither feature space" if not any(wins) else "; does not hold in both feature spaces")
        )
    decision.reason = "; ".join(parts) + spaces + note
    return decision


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def to_markdown(decisions: list[Decision], exit_code: int) -> str:
    verdict = {0: "decided", 1: "REGRESSION: a candidate breaks a floor; no alias moved", 2: "error; no alias moved"}[exit_code]
    lines = [
        f"# Promotion gate: {verdict}",
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
        lines += [
            "",
            f"## {d.model}: {d.decision}",
            "",
            f"{d.reason}. Primary metric: `{d.primary}`.",
            "",
            "| metric | candidate | champion | floor | ok |",
            "| --- | --- | --- | --- | --- |",
        ]
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
        "models": {
            d.model: {
                "decision": d.decision,
                "reason": d.reason,
                "primary": d.primary,
                "candidate_version": d.candidate_version,
                "champion_version": d.champion_version,
                "candidate": d.candidate,
                "champion": d.champion,
                "floors": [vars(f) for f in d.floors],
            }
            for d in decisions
        },
    }
