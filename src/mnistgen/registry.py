"""The model registry: versions tagged with their provenance and metrics, aliases moved by the gate.

Registered models are `mnist-<model>` for each model in params.yaml; @challenger is the newest
candidate and @champion is moved only by the promotion gate (or by an explicit rollback). Every
move of @champion is appended to the model's ledger: registered-model tags `ledger.<UTC time>.<random>`,
each a JSON record of when, who, the commit, the old and new versions and the gate's evidence, so
`history` answers which version was champion at any past time, and flags a move made outside this tool.
Every change a promotion makes is also recorded so that `revert` can put the registry back as it was
when a later step fails.

Two promotions at once (two CI jobs) cannot interleave a move: moving @champion takes the model's lock,
a registered model `<name>.lock` that only one process can create (the store's unique names make it atomic),
then re-reads @champion and gives up when it is no longer the version the gate compared against.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from . import tracking

METRIC_TAG = "metric."
LEDGER_TAG = "ledger."  # + UTC time and a random suffix: one record per move of @champion, never rewritten, never colliding
LOCK_SUFFIX = ".lock"  # the registered model a promotion holds while it moves @champion
LOCK_WAIT_SECONDS = 60.0  # how long a promotion waits for another's lock before it gives up on that model
LOCK_STALE_SECONDS = 600.0  # a lock older than this was left by a process that died: it is broken


def clock() -> float:
    """Now, in seconds since the epoch: when a ledger record says a move happened (a test replaces it)."""
    return time.time()


class ArtifactsUnavailable(RuntimeError):
    """The logged model's files cannot be read back from the artifact store."""


class ChampionMoved(RuntimeError):
    """@champion is no longer the version a decision was made against, or another promotion holds the model's lock."""


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
        records = [json.loads(v) for k, v in tags.items() if k.startswith(LEDGER_TAG)]
        return sorted(records, key=lambda r: r["at_epoch"])

    def version_grade(self, name: str, version: str | None) -> str | None:
        if version is None:
            return None
        return (self.client.get_model_version(name, version).tags or {}).get("grade")

    @contextmanager
    def lock(self, name: str, wait: float = LOCK_WAIT_SECONDS) -> Iterator[None]:
        """Hold `name`'s promotion lock: create the registered model `<name>.lock` (the store refuses a second one),
        waiting up to `wait` seconds for another holder, breaking a lock older than LOCK_STALE_SECONDS."""
        from mlflow.exceptions import MlflowException

        lock, deadline, pause = name + LOCK_SUFFIX, time.monotonic() + wait, 0.2
        while True:
            try:
                self.client.create_registered_model(
                    lock, description=json.dumps({"at": time.time(), "who": tracking.current_user()})
                )
                break
            except MlflowException as err:
                if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code) and "already exists" not in str(err):
                    raise
            if self._lock_is_stale(lock):
                self._release(lock)
                continue
            if time.monotonic() > deadline:
                raise ChampionMoved(f"another promotion of {name} holds {lock} (waited {wait:.0f} s); rerun promote")
            time.sleep(pause)
            pause = min(2 * pause, 5.0)
        try:
            yield
        finally:
            self._release(lock)

    def _lock_is_stale(self, lock: str) -> bool:
        try:
            held = json.loads(self.client.get_registered_model(lock).description or "{}")
        except Exception:  # noqa: BLE001 - released meanwhile, or unreadable: try again
            return False
        return time.time() - float(held.get("at", time.time())) > LOCK_STALE_SECONDS

    def _release(self, lock: str) -> None:
        try:
            self.client.delete_registered_model(lock)
        except Exception as err:  # noqa: BLE001 - released by a stale-lock breaker meanwhile
            if not tracking.not_found(err):
                print(f"warning: could not release {lock}: {err}")

    def move_champion(
        self, name: str, version: str, action: str, evidence: str, expected: str | None = "any", forced: bool = False
    ) -> dict:
        """Set @champion to `version` and append the move to the ledger (the record is returned), under `name`'s lock.
        `expected`: the version @champion must still be (None: unset), else ChampionMoved and nothing changes;
        "any" for a move that does not depend on it."""
        with self.lock(name):
            current = self.champion(name)
            now_champion = str(current.version) if current else None
            if expected != "any" and now_champion != expected:
                raise ChampionMoved(
                    f"@champion of {name} is v{now_champion or ' none'}, no longer v{expected or ' none'} as when the gate "
                    "decided (another promotion moved it); not moved, rerun promote"
                )
            before = self.set_alias(name, "champion", version)
            at = clock()
            record = {
                "at": datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds"),
                "at_epoch": at,
                "who": tracking.current_user() or "local",
                "commit": tracking.git_commit(),
                "action": action,
                "from": before,
                "to": str(version),
                "evidence": evidence[:2000],
                **({"forced": True} if forced else {}),
            }
            stamp = datetime.fromtimestamp(at, UTC).strftime("%Y%m%dT%H%M%S.%f")
            key = f"{LEDGER_TAG}{stamp}.{secrets.token_hex(4)}"
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


def outside_moves(history: list[dict], current: str | None) -> list[str]:
    """Where @champion moved without a ledger record: a move whose `from` is not the previous move's `to`, and a
    champion today that is not the last move's `to`."""
    flags, last = [], None
    for record in history:
        if record["from"] != last:
            flags.append(
                f"before {record['at']}: @champion was v{record['from'] or ' none'}, but the ledger's previous move "
                f"left v{last or ' none'}: moved outside mnistgen"
            )
        last = record["to"]
    if current != last:
        flags.append(
            f"now: @champion is v{current or ' none'}, but the ledger's last move left v{last or ' none'}: moved outside mnistgen"
        )
    return flags


def parse_when(text: str) -> float:
    """An ISO time ('2026-12-05T18:00:00', UTC unless it says otherwise) as seconds since the epoch."""
    moment = datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
