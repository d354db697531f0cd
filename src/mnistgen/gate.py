"""The promotion gate: pure decisions from metrics (the registry side lives in tracking.py).

Per model: every floor must hold (else the candidate is a regression and CI fails);
with no champion the floors alone decide; otherwise the candidate must beat the
champion on the primary metric by more than min_improvement + tolerance (the
tolerance absorbs run-to-run noise), or the champion stays.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import Floor, GateParams

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
        ok = ok and value >= floor.min
    if floor.max is not None:
        limits.append(f"<= {floor.max:g}")
        ok = ok and value <= floor.max
    return FloorCheck(floor.metric, value, " and ".join(limits), bool(ok))


def improvement(candidate: float, champion: float, higher_is_better: bool) -> float:
    """How much better the candidate is (positive = better), in the metric's own units."""
    return candidate - champion if higher_is_better else champion - candidate


def decide(model: str, candidate: dict[str, float], champion: dict[str, float] | None, gate: GateParams) -> Decision:
    floors = [check_floor(f, candidate) for f in gate.floors]
    decision = Decision(model, KEEP, "", gate.primary, candidate, champion, floors=floors)
    broken = [f for f in floors if not f.ok]
    if broken:
        decision.decision = REJECT
        decision.reason = "breaks floor " + "; ".join(f"{f.metric} = {'missing' if f.value is None else _fmt(f.value)} (needs {f.limit})" for f in broken)
        return decision
    if gate.primary not in candidate:
        raise KeyError(f"gate.{model}.primary: metric {gate.primary!r} is not in the candidate's metrics")
    if champion is None or gate.primary not in champion:
        decision.decision = PROMOTE
        decision.reason = "no champion yet; all floors hold"
        return decision
    gain = improvement(candidate[gate.primary], champion[gate.primary], gate.higher_is_better)
    needed = gate.min_improvement + gate.tolerance
    direction = "higher" if gate.higher_is_better else "lower"
    if gain > needed:
        decision.decision = PROMOTE
        decision.reason = f"{gate.primary} better by {gain:.4g} ({direction} is better), more than the {needed:.4g} required"
    else:
        decision.reason = f"{gate.primary} better by {gain:.4g} ({direction} is better), not more than the {needed:.4g} required"
    return decision


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def to_markdown(decisions: list[Decision], exit_code: int) -> str:
    verdict = {0: "decided", 1: "REGRESSION: a candidate breaks a floor; no alias moved", 2: "error; no alias moved"}[exit_code]
    lines = [f"# Promotion gate: {verdict}", "", "| model | decision | candidate | champion | why |", "| --- | --- | --- | --- | --- |"]
    for d in decisions:
        lines.append(f"| {d.model} | **{d.decision}** | v{d.candidate_version or '-'} | "
                     f"{'v' + d.champion_version if d.champion_version else 'none'} | {d.reason} |")
    for d in decisions:
        lines += ["", f"## {d.model}: {d.decision}", "", f"{d.reason}. Primary metric: `{d.primary}`.", "",
                  "| metric | candidate | champion | floor | ok |", "| --- | --- | --- | --- | --- |"]
        floors = {f.metric: f for f in d.floors}
        shown = [d.primary] + [m for m in floors if m != d.primary]
        for metric in shown:
            f = floors.get(metric)
            ok = "" if f is None else ("yes" if f.ok else "**NO**")
            champion = (d.champion or {}).get(metric)
            lines.append(f"| {metric} | {_fmt(d.candidate.get(metric))} | {_fmt(champion)} | {f.limit if f else ''} | {ok} |")
    return "\n".join(lines) + "\n"


def to_json(decisions: list[Decision], exit_code: int) -> dict:
    return {
        "exit_code": exit_code,
        "models": {
            d.model: {
                "decision": d.decision, "reason": d.reason, "primary": d.primary,
                "candidate_version": d.candidate_version, "champion_version": d.champion_version,
                "candidate": d.candidate, "champion": d.champion,
                "floors": [vars(f) for f in d.floors],
            }
            for d in decisions
        },
    }
