"""The model registry: versions tagged with their provenance and metrics, aliases moved by the gate.

Registered models are `mnist-<model>` for each model in params.yaml; @challenger is the newest
candidate and @champion is moved only by the promotion gate. Every change a promotion makes is
recorded so that `rollback` can put the registry back as it was when a later step fails.
"""

from __future__ import annotations

from pathlib import Path

from . import tracking

METRIC_TAG = "metric."


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

    def champion(self, name: str) -> tuple[str, dict[str, float]] | None:
        version = self.version_by_alias(name, "champion")
        return (str(version.version), self.version_metrics(version)) if version else None

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

    def set_alias(self, name: str, alias: str, version: str) -> None:
        previous = self.version_by_alias(name, alias)
        self.client.set_registered_model_alias(name, alias, version)
        self.undo.append(("alias", name, alias, str(previous.version) if previous else None))

    def rollback(self) -> None:
        """Undo this session's changes, newest first, so a failed promotion leaves the registry as it was."""
        for step in reversed(self.undo):
            try:
                if step[0] == "alias":
                    _, name, alias, previous = step
                    if previous:
                        self.client.set_registered_model_alias(name, alias, previous)
                    else:
                        self.client.delete_registered_model_alias(name, alias)
                elif step[0] == "delete_version":
                    self.client.delete_model_version(step[1], step[2])
                elif step[0] == "delete_model":
                    self.client.delete_registered_model(step[1])
            except Exception as err:  # noqa: BLE001 - keep undoing the rest
                print(f"warning: could not undo {step}: {err}")
        self.undo.clear()
