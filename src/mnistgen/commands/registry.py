"""`mnistgen registry history|rollback MODEL`: who was @champion when, and moving it back, recorded in the ledger.

    mnistgen registry history mnist-vae                         # every move of @champion, and any made outside mnistgen
    mnistgen registry history mnist-vae --at 2026-12-05T18:00   # which version was champion then (UTC)
    mnistgen registry rollback mnist-vae --to 3                 # or --to <an ISO time>: that time's champion
    mnistgen registry rollback mnist-vae --to 3 --force         # past the grade rules (the ledger says so)

A rollback keeps the gate's grade rules: never to a version of a lower grade than the champion's, and on a team
server never to a smoke or ungraded one, unless --force.
"""

from __future__ import annotations

import argparse
import sys

from .. import tracking
from ..config import GRADES
from ..gate import grade_rank
from ..registry import Registry, champion_at, outside_moves, parse_when


def rollback_refusal(
    target: str, target_grade: str | None, champion: str | None, champion_grade: str | None, team: bool
) -> str | None:
    """Why the gate's grade rules forbid moving @champion back to `target` (None: they allow it)."""
    if team and (target_grade == "smoke" or target_grade not in GRADES):
        return f"v{target} is graded {target_grade}: on a team server only a graded, non-smoke run is champion"
    if champion is not None and grade_rank(target_grade) < grade_rank(champion_grade):
        return f"v{target} is graded {target_grade}, below champion v{champion}'s {champion_grade}"
    return None


def show_history(registry: Registry, model: str, at: str | None) -> int:
    records = registry.history(model)
    if at:
        version = champion_at(records, parse_when(at))
        print(f"{model}@champion at {at}: " + (f"v{version}" if version else "none (no champion yet)"))
        return 0 if version else 1
    for r in records:
        moved = f"v{r['from']} -> v{r['to']}" if r["from"] else f"-> v{r['to']}"
        forced = " (forced)" if r.get("forced") else ""
        print(f"{r['at']}  {r['action']:9s}{forced} {moved:12s} by {r['who']} at {r['commit'][:12]}: {r['evidence']}")
    current = registry.champion(model)
    for flag in outside_moves(records, str(current.version) if current else None):
        print(f"warning: {flag}")
    return 0


def roll_back(registry: Registry, model: str, to: str, force: bool) -> int:
    records = registry.history(model)
    target = to if to.isdigit() else champion_at(records, parse_when(to))
    if target is None:
        raise ValueError(f"no version was champion of {model} at {to}")
    target_grade = (registry.client.get_model_version(model, target).tags or {}).get("grade")  # no such version: fails here
    current = registry.champion(model)
    champion = str(current.version) if current else None
    refusal = rollback_refusal(
        target, target_grade, champion, (current.tags or {}).get("grade") if current else None, tracking.is_team_server()
    )
    if refusal and not force:
        print(f"error: rollback {model}: {refusal}; --force moves it anyway (the ledger records it)", file=sys.stderr)
        return 2
    evidence = f"rollback requested to {to}" + (f"; forced past: {refusal}" if refusal else "")
    record = registry.move_champion(model, target, "rollback", evidence, expected=champion, forced=bool(refusal))
    print(f"{model}@champion: v{record['from']} -> v{record['to']} (rollback{', forced' if refusal else ''})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`mnistgen registry history MODEL [--at TIME]` and `mnistgen registry rollback MODEL --to VERSION|TIME [--force]`."""
    parser = argparse.ArgumentParser(
        prog="mnistgen registry", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="action", required=True)
    history = sub.add_parser(
        "history", help="every move of @champion, and any made outside mnistgen; with --at, the champion then"
    )
    history.add_argument("model", help="a registered model, e.g. mnist-vae")
    history.add_argument("--at", help="an ISO time, e.g. 2026-12-05T18:00:00 (UTC)")
    back = sub.add_parser("rollback", help="move @champion back to a version, or to the champion of a past time")
    back.add_argument("model")
    back.add_argument("--to", required=True, help="a version number, or an ISO time")
    back.add_argument("--force", action="store_true", help="move it even where the grade rules forbid it (recorded)")
    args = parser.parse_args(argv)
    try:
        registry = Registry()
    except Exception as err:  # noqa: BLE001 - an unreachable registry: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        if args.action == "history":
            return show_history(registry, args.model, args.at)
        return roll_back(registry, args.model, args.to, args.force)
    except Exception as err:  # noqa: BLE001 - one line, exit 2, and the registry as it was
        registry.revert()
        print(f"error: {args.action} {args.model}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
