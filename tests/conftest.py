import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def mnist_mirror() -> Path:
    """The offline copy of the four official MNIST files (MNIST_MIRROR, else ../shared/mnist)."""
    path = Path(os.environ.get("MNIST_MIRROR") or ROOT.parent / "shared" / "mnist").resolve()
    if not (path / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"no MNIST mirror at {path}")
    os.environ["MNIST_MIRROR"] = str(path)  # for the stages the tests start
    return path


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A migrated, empty MLflow SQLite store to copy: creating one takes seconds, copying it next to nothing."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db
