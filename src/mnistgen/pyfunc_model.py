"""MLflow models-from-code: the registered model that turns latent vectors (or a count) into digits.

MLflow executes this file when it loads the model, so no pickled code is ever unpickled:
the weights are a plain state_dict (torch.load with weights_only=True) and the model
config is JSON. predict takes an array [N, latent_dim] of latent vectors, or, with
params={"count": n, "seed": s}, samples n latent vectors from the model's own prior;
it returns images [N, 28, 28] as float32 in [0, 1].

A conditional model (cvae, cwgan) is asked for digits: params={"digit": 7, "count": 16}
gives 16 sevens (without a digit, count gives the digits 0..9 in turn), and explicit input
rows are the noise followed by the digit, [N, latent_dim + 1] (the digit's column holds 0..9).
A digit outside 0-9 is refused with INVALID_PARAMETER_VALUE (HTTP 400 from `mlflow models serve`).
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

MAX_COUNT = 10000


class MnistGenerator(PythonModel):
    def load_context(self, context):
        from mnistgen.models import build_model, model_params

        with open(context.artifacts["config"]) as f:
            params = model_params(json.load(f), "the model's config.json")
        self.model = build_model(params)
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()

    # The signature is given when the model is logged; np.ndarray is a hint MLflow infers nothing from.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        params = params or {}
        count = int(params.get("count") or 0)
        digit = params.get("digit")
        if digit is not None and not self.model.conditional:
            raise MlflowException(
                f"digit: {self.model.family} is not a conditional model and takes no digit", INVALID_PARAMETER_VALUE
            )
        if self.model.conditional:
            return self.predict_digits(model_input, count, digit, int(params.get("seed") or 0))
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

    @torch.no_grad()
    def predict_digits(self, model_input, count: int, digit, seed: int):
        """A conditional model: `count` samples of `digit` (or of 0..9 in turn), or explicit rows [noise..., digit]."""
        if digit is not None and (isinstance(digit, bool) or not isinstance(digit, (int, np.integer)) or not 0 <= digit <= 9):
            raise MlflowException(f"digit must be an integer 0-9, got {digit!r}", INVALID_PARAMETER_VALUE)
        if count:
            if not 0 < count <= MAX_COUNT:
                raise MlflowException(f"count must be 1..{MAX_COUNT}, got {count}", INVALID_PARAMETER_VALUE)
            generator = torch.Generator().manual_seed(seed)
            labels = None if digit is None else torch.full((count,), int(digit))
            return self.model.sample(count, generator, labels).squeeze(1).numpy().astype(np.float32)
        rows = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        width = self.model.latent_dim + 1
        if rows.dim() != 2 or rows.shape[1] != width or not torch.isfinite(rows).all():
            raise MlflowException(
                f"expected finite rows of shape [N, {width}]: {self.model.latent_dim} noise values, then the digit; got {tuple(rows.shape)}",
                INVALID_PARAMETER_VALUE,
            )
        eps, column = rows[:, :-1], rows[:, -1]
        bad = (column != column.round()) | (column < 0) | (column > 9)
        if bad.any():
            raise MlflowException(
                f"digit column (the last) must hold integers 0-9, got {column[bad][0].item():g}", INVALID_PARAMETER_VALUE
            )
        labels = column.long() if digit is None else torch.full((len(rows),), int(digit))
        return self.model.decode_noise(eps, labels).squeeze(1).numpy().astype(np.float32)


mlflow.models.set_model(MnistGenerator())
