"""MLflow tracking behind a few small functions: the store's URI, runs and their lifecycle (heartbeat, signals, runs a
dead process left RUNNING). The library below it (data, models, training, evaluation, metrics, the gate) imports no
mlflow; the logged model's files are mnistgen.logged_model's, the registry mnistgen.registry's.

Embedded default: tracking store sqlite:///mlflow.db and artifacts in mlartifacts/, both at
the repo root; MLFLOW_TRACKING_URI overrides the store (a team server scales it out).
Under DVC the repo root is DVC_ROOT, which a queued experiment (`dvc exp run --queue`, run in a
temporary copy under .dvc/tmp/exps) gets pointing at the parent repo: every experiment logs into
the one store of the repo it was queued from.
Set MNISTGEN_TRACKING=off to train and evaluate without MLflow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Self

from . import logged_model
from .utils import StageError, sha256_json, write_json

DEFAULT_URI = "sqlite:///mlflow.db"
ARTIFACT_ROOT = "mlartifacts"
# Marks the experiment as model training ("Machine learning") rather than GenAI, for the MLflow UIs
# that read the tag. The open-source 3.17 UI ignores it and follows its own GenAI / Model training
# switch instead: open http://<server>/#/experiments/<id>?workflowType=machine_learning.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# A started run sets this tag to the time (unix seconds) every HEARTBEAT_SECONDS while its process lives. A RUNNING
# run whose heartbeat is older than the staleness limit (MNISTGEN_STALE_SECONDS, 10 min) belongs to a process that
# died (SIGKILL, a lost machine): the next run of the same stage marks it FAILED, from any machine.
HEARTBEAT_TAG = "mnistgen.heartbeat"
HEARTBEAT_SECONDS = float(os.environ.get("MNISTGEN_HEARTBEAT_SECONDS", "60"))


def stale_seconds() -> float:
    return float(os.environ.get("MNISTGEN_STALE_SECONDS", "600"))


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cancelled CI job, `kill`): unwinds like Ctrl-C, so the run ends KILLED."""


def enabled() -> bool:
    return os.environ.get("MNISTGEN_TRACKING", "on").lower() not in {"off", "0", "false"}


def tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = os.environ.get("DVC_ROOT")  # set by DVC for every stage: the repo root, the parent repo's for a queued experiment
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}" if root else DEFAULT_URI


def dvc_experiment_tags() -> dict[str, str]:
    """The DVC experiment a stage runs in (`dvc exp run`, queued or not): its name and baseline commit.

    Together they name the experiment's git ref, refs/exps/<baseline[:2]>/<baseline[2:]>/<name>, so an
    MLflow run and the row of `dvc exp show` can be matched both ways. Empty under plain `dvc repro`.
    """
    names = {"DVC_EXP_NAME": "dvc_exp_name", "DVC_EXP_BASELINE_REV": "dvc_exp_baseline_rev"}
    return {tag: os.environ[var] for var, tag in names.items() if os.environ.get(var)}


def _mlflow():
    # A server that blips (a restart, a 5xx) gets 3 retries with backoff (about 1, 2, 4 s); one that stays down fails the
    # stage with one line (check_reachable, Run.__exit__) within seconds, not minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.5")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A team server's artifacts stream through it (its permission checks; the CA of MLFLOW_TRACKING_SERVER_CERT_PATH),
    # not by presigned URLs straight to its object store.
    os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    import warnings

    warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def client():
    return _mlflow().MlflowClient()


def download_artifacts(artifact_uri: str, dst: str | Path) -> str:
    """Download `artifact_uri` (runs:/..., models:/...) into dst; the local path."""
    return _mlflow().artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst))


def check_reachable() -> None:
    """Fail before any work starts when the tracking store cannot be reached."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent
        if not folder.is_dir():
            raise StageError(f"MLflow tracking store {uri} cannot be reached: folder {folder} does not exist")
    try:
        client().search_experiments(max_results=1)
    except Exception as err:
        status = getattr(err, "get_http_status_code", lambda: None)()
        if status == 401 or " 401 " in str(err):  # a team server with basic-auth refused the credentials
            user = os.environ.get("MLFLOW_TRACKING_USERNAME")
            who = f"user '{user}'" if user else "a request without credentials"
            raise StageError(
                f"MLflow tracking server {uri} refused {who} (401): set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD to a valid account"
            ) from err
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StageError(f"MLflow tracking store {uri} cannot be reached: {first_line[:300]}") from err


def not_found(err: BaseException) -> bool:
    """True for MLflow's answer about a model, version, alias or run that does not exist."""
    return (
        "RESOURCE_DOES_NOT_EXIST" in str(getattr(err, "error_code", ""))
        or "not found" in str(err).lower()
        or "does not exist" in str(err).lower()
    )


def permission_denied(err: BaseException) -> bool:
    """True for a 403 from a team server with basic-auth (the account may not do this)."""
    return getattr(err, "error_code", None) == "PERMISSION_DENIED" or "403 != 200" in str(err)


def is_team_server() -> bool:
    """True when runs go to a tracking server (team mode), not to a local store."""
    return tracking_uri().startswith(("http://", "https://"))


def current_user() -> str | None:
    return os.environ.get("MLFLOW_TRACKING_USERNAME")


def experiment_id(name: str) -> str:
    """The experiment's id, creating it (artifacts under mlartifacts/ for a local store) if needed.

    It is tagged as a model-training experiment (EXPERIMENT_KIND_TAG); one created without the tag gets it here.
    """
    mlflow = _mlflow()
    found = mlflow.get_experiment_by_name(name)
    if found:
        if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            mlflow.MlflowClient().set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id
    location = None
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):  # artifacts beside the database, wherever the stage runs
        location = (Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent / ARTIFACT_ROOT).as_uri()
    elif uri.startswith("file:") or "://" not in uri:
        location = (Path.cwd() / ARTIFACT_ROOT).resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_hash(prepared: str | Path = "data/prepared", lock: str | Path = "dvc.lock") -> str:
    """DVC's md5 of data/prepared from dvc.lock; outside DVC, a digest of prepare's own hashes."""
    import yaml

    lock = Path(lock)
    if lock.exists():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for out in stages.get("prepare", {}).get("outs", []):
            if out.get("path") == str(prepared).rstrip("/"):
                return out["md5"]
    meta = Path(prepared) / "meta.json"
    if meta.exists():
        return "sha256:" + sha256_json(json.loads(meta.read_text())["sha256"])
    return "unknown"


class Run:
    """One MLflow run; a no-op when tracking is off, so the library works on a bare GPU box.

    A context manager, like `mlflow.start_run`: `with Run.start(...) as run:` ends the run
    FINISHED when the block completes, KILLED on SIGINT or SIGTERM, and FAILED when it raises.
    While a started run is open, a thread beats its heartbeat (HEARTBEAT_TAG).
    """

    def __init__(self, run_id: str | None, beat: bool = False):
        self.run_id = run_id
        self.beat = beat and run_id is not None
        self._stop = threading.Event()
        self._sigterm: Any = None

    @classmethod
    def start(cls, experiment: str, run_name: str, tags: dict[str, str]) -> Run:
        """A new run tagged with `tags` and, inside a DVC experiment, its name and baseline (dvc_experiment_tags)."""
        if not enabled():
            return cls(None)
        check_reachable()
        _fail_unfinished()
        experiment = experiment_id(experiment)
        fail_stale_runs(experiment, run_name)
        tags = {**dvc_experiment_tags(), **tags, HEARTBEAT_TAG: str(int(time.time()))}
        run = client().create_run(experiment, run_name=run_name, tags=tags)
        return cls(run.info.run_id, beat=True)

    @classmethod
    def resume(cls, run_id: str | None) -> Run:
        if run_id and enabled():
            check_reachable()
            return cls(run_id)
        return cls(None)

    def __enter__(self) -> Self:
        if self.beat:
            threading.Thread(target=self._heartbeat, name=f"heartbeat {self.run_id}", daemon=True).start()
        if self.run_id and threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                client().set_tag(self.run_id, HEARTBEAT_TAG, str(int(time.time())))
            except Exception:  # noqa: BLE001, S112 - a missed beat is harmless; the stage reports a store that stays down
                continue

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
        if exc_type is None:
            self.end("FINISHED")
            return
        if issubclass(exc_type, KeyboardInterrupt):  # Ctrl-C or SIGTERM: the user or the runner stopped it
            try:
                self.end("KILLED")
            except Exception as err:  # noqa: BLE001 - the interruption is what the user must see
                _remember_unfinished(self.run_id)
                print(f"warning: could not mark MLflow run {self.run_id} KILLED: {_first_line(err)}")
            return
        try:
            self.end("FAILED")
        except Exception as err:  # noqa: BLE001 - the store may be what failed: keep the original error
            # The server is gone: remember the run, so the next Run.start marks it FAILED instead of leaving it RUNNING forever.
            _remember_unfinished(self.run_id)
            if _store_error(exc):
                raise StageError(
                    f"MLflow tracking store {tracking_uri()} failed during the stage ({_first_line(exc)}); "
                    f"run {self.run_id} will be marked FAILED by the next stage that reaches the store"
                ) from exc
            print(f"warning: could not mark MLflow run {self.run_id} FAILED: {_first_line(err)}")

    def log_params(self, params: dict[str, Any]) -> None:
        if self.run_id:
            from mlflow.entities import Param

            client().log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run_id:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if isinstance(v, (int, float))]
            client().log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.run_id:
            from mlflow.entities import RunTag

            client().log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.run_id:
            client().log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        if self.run_id:
            client().log_artifacts(self.run_id, str(folder), artifact_path)

    def log_generator(self, weights: Path, config: Path, latent_dim: int, example, conditional: bool = False) -> str | None:
        """Log the trained model into this run (mnistgen.logged_model); its URI (models:/<model_id>), or None untracked."""
        if not self.run_id:
            return None
        with _mlflow().start_run(run_id=self.run_id):
            return logged_model.log(weights, config, latent_dim, example, conditional)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            client().set_terminated(self.run_id, status)


UNFINISHED = Path("checkpoints") / "unfinished_mlflow_runs.json"  # runs whose end the store did not hear (git-ignored)


def _raise_terminated(signum, frame) -> None:
    raise Terminated(f"signal {signum}")


def fail_stale_runs(experiment: str, run_name: str) -> list[str]:
    """Mark FAILED the RUNNING runs of this stage (experiment and run name) whose heartbeat is older than the
    staleness limit: their process died without ending them. A run with a fresh heartbeat (a live run on another
    machine) is left alone. Returns the runs marked."""
    now = time.time()
    quoted = "'" + run_name.replace("'", "\\'") + "'"
    runs = client().search_runs(
        [experiment], filter_string=f"attributes.status = 'RUNNING' and attributes.run_name = {quoted}", max_results=100
    )
    marked = []
    for run in runs:
        beat = float(run.data.tags.get(HEARTBEAT_TAG, run.info.start_time / 1000))
        if now - beat > stale_seconds():
            client().set_terminated(run.info.run_id, "FAILED")
            client().set_tag(run.info.run_id, "mnistgen.failed_because", f"no heartbeat for {now - beat:.0f} s")
            print(f"note: marked MLflow run {run.info.run_id} FAILED (its process stopped beating {now - beat:.0f} s ago)")
            marked.append(run.info.run_id)
    return marked


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def _store_error(err: BaseException | None) -> bool:
    """An error talking to the tracking store (not a bug in the stage)."""
    if err is None:
        return False
    names = {c.__module__.split(".")[0] for c in type(err).__mro__}
    return bool(names & {"mlflow", "requests", "urllib3"}) or isinstance(err, ConnectionError)


def _store_key(uri: str) -> str:
    """The store a URI names: sqlite:///mlflow.db run from the repo root and DVC's absolute form are one store."""
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).expanduser().resolve())
    return uri


def _read_unfinished() -> list[str]:
    if not UNFINISHED.exists():
        return []
    try:
        return json.loads(UNFINISHED.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StageError(f"{UNFINISHED}: cannot read the record of unfinished MLflow runs ({err}); delete it") from err


def _remember_unfinished(run_id: str | None) -> None:
    if not run_id:
        return
    known = _read_unfinished()
    write_json(UNFINISHED, sorted({*known, f"{_store_key(tracking_uri())} {run_id}"}))


def _fail_unfinished() -> None:
    """Mark FAILED the runs a crashed store never heard end (only those of this tracking URI)."""
    entries = _read_unfinished()
    if not entries:
        return
    left = []
    for entry in entries:
        uri, _, run_id = entry.rpartition(" ")
        if _store_key(uri) != _store_key(tracking_uri()):
            left.append(entry)
            continue
        try:
            status = client().get_run(run_id).info.status
        except Exception as err:
            if not not_found(err):
                raise
            continue
        if status == "RUNNING":
            client().set_terminated(run_id, "FAILED")
            print(f"note: marked MLflow run {run_id} FAILED (its stage ended while the store was down)")
    if left:
        write_json(UNFINISHED, left)
    else:
        UNFINISHED.unlink(missing_ok=True)


def write_run_file(path: Path, run: Run, model_uri: str | None) -> None:
    write_json(path, {"run_id": run.run_id, "model_uri": model_uri, "tracking_uri": tracking_uri() if run.run_id else None})


def read_run_file(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StageError(f"{path}: cannot read the training run record ({err})") from err
