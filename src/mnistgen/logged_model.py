"""The model a training run logs: MLflow models-from-code, weights as a plain state_dict, the package code it needs.

Its input is latent vectors [N, latent_dim]; a conditional model's rows end with the digit ([N, latent_dim + 1]), and
its params take `digit` (0-9) for count-sampled digits. Loading it unpickles no code: pyfunc_model.py builds the model
from config.json and loads weights.pt. Its pip requirements are every distribution its code imports, pinned.
"""

from __future__ import annotations

import ast
import functools
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from .utils import StageError

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE_DIR = Path(__file__).parent
MODEL_CODE = (
    "__init__.py",
    "config.py",
    "distributed.py",
    "utils.py",
    "models",
)  # what pyfunc_model.py imports (tests/test_tracking.py checks it): shipped with the logged model


def log(weights: Path, config: Path, latent_dim: int, example, conditional: bool = False) -> str:
    """Log the model into the active MLflow run; returns its URI (models:/<model_id>) for registration."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, latent_dim + int(conditional)))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28))]),
        params=ParamSchema(
            [ParamSpec("count", "long", 0), ParamSpec("seed", "long", 0)]
            + ([ParamSpec("digit", "long", None)] if conditional else [])
        ),
    )
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / PACKAGE_DIR.name
        package.mkdir()
        for name in MODEL_CODE:
            if (PACKAGE_DIR / name).is_dir():
                shutil.copytree(PACKAGE_DIR / name, package / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(PACKAGE_DIR / name, package / name)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={"weights": str(weights), "config": str(config)},
            code_paths=[str(package)],
            signature=signature,
            input_example=np.asarray(example, dtype=np.float32),
            pip_requirements=model_requirements(),
        )
    return info.model_uri


def imported_packages(files: list[Path]) -> set[str]:
    """The top-level names that `files` import, less the standard library and this package."""
    names = set()
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {PACKAGE_DIR.name}


@functools.cache  # the environment does not change while a process runs; asking it costs about a second
def model_requirements() -> list[str]:
    """pip requirements of the logged model: every distribution its code imports, pinned to this environment's version."""
    from importlib.metadata import packages_distributions, version

    files = [
        PYFUNC_FILE,
        *(
            f
            for name in MODEL_CODE
            for f in ([PACKAGE_DIR / name] if name.endswith(".py") else sorted((PACKAGE_DIR / name).glob("*.py")))
        ),
    ]
    providers = packages_distributions()
    missing = sorted(n for n in imported_packages(files) if n not in providers)
    if missing:
        raise StageError(f"the logged model's code imports {', '.join(missing)}, which no installed distribution provides")
    # A name two distributions provide (mlflow and mlflow-skinny) is the one of the same name.
    dists = sorted({n if n in providers[n] else providers[n][0] for n in imported_packages(files)})
    return [f"{d}=={version(d).split('+')[0]}" for d in dists]
