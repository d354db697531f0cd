"""MLflow models-from-code: the registered model that turns latent vectors (or a count) into digits.

MLflow executes this file when it loads the model, so no pickled code is ever unpickled:
the weights are a plain state_dict (torch.load with weights_only=True) and the model
config is JSON. predict takes an array [N, latent_dim] of latent vectors, or, with
params={"count": n, "seed": s}, samples n latent vectors from the model's own prior;
it returns images [N, 28, 28] as float32 in [0, 1].
"""
from __future__ import annotations

import json
import warnings

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

MAX_COUNT = 10000
# The signature is given explicitly when the model is logged; no type-hint inference wanted.
warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")


class MnistGenerator(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from mnistgen.config import model_params
        from mnistgen.models import build_model

        with open(context.artifacts["config"]) as f:
            params = model_params(json.load(f), "the model's config.json")
        self.model = build_model(params)
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()

    def predict(self, context, model_input, params=None):
        params = params or {}
        count = int(params.get("count") or 0)
        with torch.no_grad():
            if count:
                if not 0 < count <= MAX_COUNT:
                    raise MlflowException(f"count must be 1..{MAX_COUNT}, got {count}", INVALID_PARAMETER_VALUE)
                generator = torch.Generator().manual_seed(int(params.get("seed") or 0))
                z = self.model.sample_latent(count, generator)
            else:
                z = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
                if z.dim() != 2 or z.shape[1] != self.model.latent_dim or not torch.isfinite(z).all():
                    raise MlflowException(
                        f"expected finite latent vectors of shape [N, {self.model.latent_dim}], got {tuple(z.shape)}",
                        INVALID_PARAMETER_VALUE,
                    )
            return self.model.decode(z).squeeze(1).numpy().astype(np.float32)


mlflow.models.set_model(MnistGenerator())
