"""The model registry: versions tagged with their provenance and metrics, aliases moved by the gate.

Registered models are `mnist-<model>` for each model in params.yaml; @challenger is the newest
candidate and @champion is moved only by the promotion gate (or by an explicit rollback). Every
move of @champion is appended to the model's ledger: registered-model tags `ledger.00001`, ... each
a JSON record of when, who, the commit, the old and new versions and the gate's evidence, so
`history` answers which version was champion at any past time. Every change a promotion makes is
also recorded so that `revert` can put the registry back as it was when a later step fails.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

from . import tracking

METRIC_TAG = "metric."
LEDGER_TAG = "ledger."  # + a zero-padded sequence number: one record per move of @champion, never rewritten


class ArtifactsUnavailable(RuntimeError):
    """The logged model's files cannot be read back from the artifact store."""


def registered_name(model: str) -> str:
    return f"mnist-{model}"


class Registry:
    """Registered models mnist-<family>; @challenger = newest candidate, @champion = moved only by the gate."""

    def __init__(self):
        tracking.check_reachable()
        self.client = tracking.client()
        self.undo: list = []  # how to put the registry back if a later step fails

    def version_by_alias(self, name: str, alias: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException as err:
            if tracking.not_found(err):
                return None
            # A server with basic-auth answers 403, not 404, about a model that does not exist (no existence oracle).
            if tracking.permission_denied(err) and not self.client.search_registered_models(f"name = '{name}'"):
                return None
            raise

    @staticmethod
    def version_metrics(version) -> dict[str, float]:
        return {k.removeprefix(METRIC_TAG): float(v) for k, v in (version.tags or {}).items() if k.startswith(METRIC_TAG)}

    def champion(self, name: str):
        """The champion's model version (with its tags), or None."""
        return self.version_by_alias(name, "champion")

    def register(self, name: str, model_uri: str, run_id: str, tags: dict[str, str], metrics: dict[str, float]) -> str:
        """A new version of `name` for this run's model (the same version again if this run is registered already)."""
        from mlflow.exceptions import MlflowException

        existing = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")  # errors surface
        if existing:
            return str(max(existing, key=lambda v: int(v.version)).version)
        try:
            self.client.get_registered_model(name)
        except MlflowException as err:
            if not (tracking.not_found(err) or tracking.permission_denied(err)):  # basic-auth hides a missing model behind 403
                raise
            self.client.create_registered_model(
                name, description=f"MNIST {name.split('-')[-1].upper()} generator: latent vectors -> 28x28 digits"
            )
            self.undo.append(("delete_model", name))
        self.check_artifacts(model_uri)
        all_tags = {**tags, **{f"{METRIC_TAG}{k}": repr(float(v)) for k, v in metrics.items() if isinstance(v, (int, float))}}
        # A logged model (models:/<model_id>) is named by its id too: a tracking server requires it, SQLite accepts it.
        model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
        version = self.client.create_model_version(name, model_uri, run_id=run_id, tags=all_tags, model_id=model_id)
        self.undo.append(("delete_version", name, version.version))
        return str(version.version)

    @staticmethod
    def check_artifacts(model_uri: str) -> None:
        """Read the logged model's files back before registering it, so that no version points at artifacts
        the store cannot serve (a team object store that is down fails here, before any change)."""
        import tempfile

        from mlflow.artifacts import download_artifacts

        with tempfile.TemporaryDirectory() as tmp:
            try:
                download_artifacts(artifact_uri=model_uri, dst_path=tmp)
                if not (Path(tmp) / "MLmodel").exists():
                    raise FileNotFoundError("no MLmodel file among them")
            except Exception as err:
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
                raise ArtifactsUnavailable(f"the artifacts of {model_uri} cannot be read ({first}); not registering it") from err

    def set_alias(self, name: str, alias: str, version: str) -> str | None:
        """Point `alias` at `version`; returns the version it pointed at before (None: it was unset)."""
        previous = self.version_by_alias(name, alias)
        self.client.set_registered_model_alias(name, alias, version)
        self.undo.append(("alias", name, alias, str(previous.version) if previous else None))
        return str(previous.version) if previous else None

    def describe(self, name: str, version: str, card: str) -> None:
        """The version's description (shown on its page in the MLflow UI): its model card."""
        self.client.update_model_version(name, version, description=card)

    def history(self, name: str) -> list[dict]:
        """The ledger of `name`: every move of @champion, oldest first."""
        tags = self.client.get_registered_model(name).tags or {}
        return [json.loads(v) for k, v in sorted(tags.items()) if k.startswith(LEDGER_TAG)]

    def move_champion(self, name: str, version: str, action: str, evidence: str, now: float | None = None) -> dict:
        """Set @champion to `version` and append the move to the ledger (the record is returned)."""
        before = self.set_alias(name, "champion", version)
        at = time.time() if now is None else now
        record = {
            "seq": len(self.history(name)) + 1,
            "at": datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds"),
            "at_epoch": at,
            "who": tracking.current_user() or "local",
            "commit": tracking.git_commit(),
            "action": action,
            "from": before,
            "to": str(version),
            "evidence": evidence[:2000],
        }
        key = f"{LEDGER_TAG}{record['seq']:05d}"
        self.client.set_registered_model_tag(name, key, json.dumps(record, sort_keys=True))
        self.undo.append(("ledger", name, key))
        return record

    def revert(self) -> None:
        """Undo this session's changes, newest first, so a failed promotion leaves the registry as it was."""
        for step in reversed(self.undo):
            try:
                if step[0] == "alias":
                    _, name, alias, previous = step
                    if previous:
                        self.client.set_registered_model_alias(name, alias, previous)
                    else:
                        self.client.delete_registered_model_alias(name, alias)
                elif step[0] == "ledger":
                    self.client.delete_registered_model_tag(step[1], step[2])
                elif step[0] == "delete_version":
                    self.client.delete_model_version(step[1], step[2])
                elif step[0] == "delete_model":
                    self.client.delete_registered_model(step[1])
            except Exception as err:  # noqa: BLE001 - keep undoing the rest
                print(f"warning: could not undo {step}: {err}")
        self.undo.clear()


def champion_at(history: list[dict], when: float) -> str | None:
    """The version that was @champion at time `when` (seconds since the epoch), from a ledger; None before the first."""
    current = None
    for record in history:
        if record["at_epoch"] <= when:
            current = record["to"]
    return current


def parse_when(text: str) -> float:
    """An ISO time ('2026-12-05T18:00:00', UTC unless it says otherwise) as seconds since the epoch."""
    moment = datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def main(argv: list[str] | None = None) -> int:
    """`mnistgen registry history MODEL [--at TIME]` and `mnistgen registry rollback MODEL --to VERSION|TIME`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="mnistgen registry", description=main.__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    history = sub.add_parser("history", help="every move of @champion; with --at, the champion at that time")
    history.add_argument("model", help="a registered model, e.g. mnist-vae")
    history.add_argument("--at", help="an ISO time, e.g. 2026-12-05T18:00:00 (UTC)")
    back = sub.add_parser("rollback", help="move @champion back to a version, or to the champion of a past time")
    back.add_argument("model")
    back.add_argument("--to", required=True, help="a version number, or an ISO time")
    args = parser.parse_args(argv)
    try:
        registry = Registry()
    except Exception as err:  # noqa: BLE001 - an unreachable registry: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        records = registry.history(args.model)
        if args.action == "history":
            if args.at:
                version = champion_at(records, parse_when(args.at))
                print(f"{args.model}@champion at {args.at}: " + (f"v{version}" if version else "none (no champion yet)"))
                return 0 if version else 1
            for r in records:
                moved = f"v{r['from']} -> v{r['to']}" if r["from"] else f"-> v{r['to']}"
                print(f"{r['at']}  {r['action']:9s} {moved:12s} by {r['who']} at {r['commit'][:12]}: {r['evidence']}")
            return 0
        target = args.to if args.to.isdigit() else champion_at(records, parse_when(args.to))
        if target is None:
            raise ValueError(f"no version was champion of {args.model} at {args.to}")
        registry.client.get_model_version(args.model, target)  # a version that does not exist fails here, nothing moved
        record = registry.move_champion(args.model, target, "rollback", f"rollback requested to {args.to}")
    except Exception as err:  # noqa: BLE001 - one line, exit 2, and the registry as it was
        registry.revert()
        print(f"error: {args.action} {args.model}: {err}", file=sys.stderr)
        return 2
    print(f"{args.model}@champion: v{record['from']} -> v{record['to']} (rollback, ledger #{record['seq']})")
    return 0
