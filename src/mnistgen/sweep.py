"""A shared hyper-parameter sweep: one Optuna study over a model's params, any number of workers.

    mnistgen sweep vae --trials 10                        # embedded: sqlite:///optuna.db
    mnistgen sweep vae --trials 10 --worker 1 &           # a second worker joins the same study
    MNISTGEN_OPTUNA_STORAGE=postgresql+psycopg://... mnistgen sweep wgan --trials 10   # team mode

The study lives in a database (--storage, else MNISTGEN_OPTUNA_STORAGE, else sqlite:///optuna.db), so workers
in other processes or on other machines share it by URL: each asks the database for its next trial, and the
database numbers them, so none is lost or run twice. The search space is params.yaml's `sweep.space.<model>`;
every other value is the model's own section. Each trial trains on the training split with the shared loop
and is scored on the *validation* split only (the test split is never read):

- families with a likelihood or reconstruction loss (AE, VAE, CVAE): the validation loss (the VAE's -ELBO);
- GAN families: FID_cls of `sweep.fid_samples` samples against the validation images, in the first evaluator's
  feature space (--evaluator, the reference stage's output); their losses do not compare across trials.

The value is reported after every epoch; MedianPruner stops a trial whose value is worse than the median of
earlier trials at the same epoch. In MLflow (experiment `sweep.experiment`) the study is one parent run and
each trial a run nested under it (tag mlflow.parentRunId; the worker that creates the study creates the parent
and stores its id in the study, the others read it there). At the end the best trial's params are printed as
`dvc exp run -S ...` overrides and, with --out, written to a JSON file.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

from . import data, metrics, tracking, training
from .config import (
    Choice,
    FloatRange,
    IntRange,
    ParamsError,
    RunParams,
    SweepParams,
    flatten,
    section,
    validate_section,
)
from .evaluation import load_classifiers
from .models import build_model, model_params
from .utils import StageError, pick_device, seed_everything

DEFAULT_STORAGE = "sqlite:///optuna.db"
PARENT_ATTR = "mlflow_parent_run_id"


def load_space(params: dict, model: str) -> tuple[SweepParams, dict]:
    """The sweep settings and the model's section; every value the space can take must be valid for the model."""
    sweep = validate_section(SweepParams, section(params, "sweep"), "sweep")
    base = section(params, f"models.{model}")
    if model not in sweep.space:
        raise ParamsError(f"params.yaml: sweep.space.{model}: missing key (the sweep's search space for model {model!r})")
    for key, dim in sweep.space[model].items():
        if key not in base or key == "family":
            raise ParamsError(f"params.yaml: sweep.space.{model}.{key}: not a key of models.{model}")
        for value in dim.choices if isinstance(dim, Choice) else (dim.low, dim.high):
            model_params({**base, key: value}, f"sweep.space.{model}")  # e.g. a float range over an int key fails here
    return sweep, base


def suggest(trial, space: dict) -> dict:
    out = {}
    for key, dim in space.items():
        if isinstance(dim, Choice):
            out[key] = trial.suggest_categorical(key, list(dim.choices))
        elif isinstance(dim, IntRange):
            out[key] = trial.suggest_int(key, dim.low, dim.high, log=dim.log)
        elif isinstance(dim, FloatRange):
            out[key] = trial.suggest_float(key, dim.low, dim.high, log=dim.log)
    return out


def literal(value) -> str:
    """A value as `dvc exp run -S` takes it and params.yaml keeps its type: floats always with a '.', never an
    exponent (YAML 1.1 readers take 1e-05 for a string)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        import numpy as np

        text = np.format_float_positional(float(f"{value:.6g}"), trim="-")  # 6 significant digits, no exponent
        return text if "." in text else text + ".0"
    return str(value)


def overrides(model: str, best: dict) -> list[str]:
    return [f"models.{model}.{key}={literal(value)}" for key, value in best.items()]


def exp_run_command(model: str, best: dict, trials: int = 1) -> str:
    """The `dvc exp run` line of the best trial; MNISTGEN_SELECTED_FROM tells its run, and so the gate, how many
    trials it was chosen among (the gate then measures it again on fresh samples, at alpha / trials)."""
    return f"MNISTGEN_SELECTED_FROM={trials} dvc exp run " + " ".join(f"-S '{o}'" for o in overrides(model, best))


class ValidationFID:
    """FID_cls of a model's samples against the validation images, in the first evaluator's feature space."""

    def __init__(self, evaluator: Path, val_images: torch.Tensor, samples: int, seed: int):
        self.classifier = load_classifiers(evaluator, val_images.device)[""]
        self.val_feats = self.classifier.features_and_probs(val_images)[0]
        self.samples, self.seed = samples, seed

    @torch.no_grad()
    def __call__(self, model) -> float:
        model.eval()  # as the evaluate stage samples (batch norm in inference mode); the caller sets train() back
        generator = torch.Generator(device=model.device).manual_seed(self.seed)
        images = torch.cat([model.sample(min(1000, self.samples - i), generator) for i in range(0, self.samples, 1000)])
        return metrics.fid(self.classifier.features_and_probs(images.float())[0], self.val_feats)


class Objective:
    """One trial: train the model with the trial's params, report the validation objective each epoch."""

    def __init__(
        self,
        model: str,
        base: dict,
        sweep: SweepParams,
        run_params: RunParams,
        prepared: Path,
        evaluator: Path | None,
        parent_run_id: str | None,
        study_name: str,
    ):
        self.model, self.base, self.sweep, self.run_params = model, base, sweep, run_params
        self.parent_run_id, self.study_name = parent_run_id, study_name
        self.device = pick_device(run_params.device)
        train_split, val_split = data.load_split(prepared, "train"), data.load_split(prepared, "val")  # never the test split
        self.train_x, self.val_x = data.to_float(train_split.images, self.device), data.to_float(val_split.images, self.device)
        self.train_y, self.val_y = train_split.labels.to(self.device), val_split.labels.to(self.device)
        probe = build_model(model_params(base, f"models.{model}")).to(self.device)
        has_loss = "val_loss" in training.validation_losses(
            probe, self.val_x[:2], 2, self.val_y[:2] if probe.conditional else None
        )
        self.name = "val_loss" if has_loss else "val_fid_cls"
        self.fid = None
        if not has_loss:
            if evaluator is None:
                raise StageError(
                    f"{model}: a GAN family is scored by FID_cls on the validation images: give --evaluator "
                    "(the reference stage's folder, e.g. models/evaluator)"
                )
            self.fid = ValidationFID(evaluator, self.val_x, sweep.fid_samples, run_params.seed)

    def __call__(self, trial) -> float:
        import optuna

        chosen = suggest(trial, self.sweep.space[self.model])
        params = model_params({**self.base, **chosen}, f"models.{self.model}")
        seed_everything(
            self.run_params.seed, self.run_params.deterministic
        )  # every trial from the same seed: only the params differ
        model = build_model(params).to(self.device)
        tags = {
            "model": self.model,
            "family": params.family,
            "stage": "sweep",
            "optuna_study": self.study_name,
            "optuna_trial": str(trial.number),
            "objective": self.name,
            "git_commit": tracking.git_commit(),
            "grade": "sweep",  # a trial is never a champion over a full run
        }
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = tracking.Run.start(self.sweep.experiment, run_name=f"{self.model} trial {trial.number}", tags=tags)
        run.log_params({**flatten({"model": params}), **{f"trial.{k}": v for k, v in chosen.items()}})
        value = float("nan")

        def on_epoch(epoch: int, row: dict, model) -> None:
            nonlocal value
            value = row["val_loss"] if self.fid is None else self.fid(model)
            model.train()
            run.log_metrics({**{k: v for k, v in row.items() if k != "epoch"}, "objective": value}, step=epoch)
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}: {self.name} {value:.4g}")

        try:
            training.train(
                model,
                self.train_x,
                self.val_x,
                seed=self.run_params.seed,
                on_epoch=on_epoch,
                progress=False,
                train_labels=self.train_y,
                val_labels=self.val_y,
            )
        except optuna.TrialPruned:
            run.set_tags({"optuna_state": "PRUNED"})
            run.end("KILLED")
            raise
        except BaseException:
            run.set_tags({"optuna_state": "FAIL"})
            run.end("FAILED")
            raise
        run.set_tags({"optuna_state": "COMPLETE"})
        run.end("FINISHED")
        return value


def storage(url: str):
    import optuna

    # SQLite: wait for the file lock instead of failing when another worker writes (the team's PostgreSQL needs none).
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(5):
        try:
            # Heartbeats: a trial whose worker died is marked FAIL by the next worker instead of staying RUNNING forever.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=30, grace_period=120)
        except SQLAlchemyError:  # workers starting together on a new database race to create its tables: the loser retries
            if attempt == 4:
                raise
            time.sleep(1 + attempt)


def safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_study(name: str, url: str, model: str, sweep: SweepParams, worker: int, wait_s: float = 120):
    """Create the study (and its MLflow parent run) or join it; returns (study, parent run id or None)."""
    import optuna

    sampler = optuna.samplers.TPESampler(seed=sweep.sampler_seed + worker)
    # steps are epochs 1..N: the earliest a trial can be pruned is at step n_warmup_steps
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=sweep.pruner_startup_trials, n_warmup_steps=sweep.pruner_warmup_epochs + 1
    )
    store = storage(url)
    try:
        study = optuna.create_study(study_name=name, storage=store, direction="minimize", sampler=sampler, pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=store, sampler=sampler, pruner=pruner)
        deadline = time.monotonic() + wait_s
        while PARENT_ATTR not in study.user_attrs:  # the creating worker is still starting its parent run
            if time.monotonic() > deadline:
                raise StageError(
                    f"study {name!r} in {safe_url(url)} has no sweep run after {wait_s:.0f} s: not made by this tool?"
                ) from None
            time.sleep(1)
        if study.user_attrs.get("model") != model:
            raise StageError(
                f"study {name!r} sweeps model {study.user_attrs.get('model')!r}, not {model!r}: pick another --study"
            ) from None
        return study, study.user_attrs[PARENT_ATTR] or None
    parent = tracking.Run.start(
        sweep.experiment,
        run_name=f"sweep {name}",
        tags={
            "model": model,
            "stage": "sweep",
            "optuna_study": name,
            "optuna_storage": safe_url(url),
            "git_commit": tracking.git_commit(),
        },
    )
    parent.log_params({f"space.{k}": v.model_dump_json() for k, v in sweep.space[model].items()})
    study.set_user_attr("model", model)
    study.set_user_attr(PARENT_ATTR, parent.run_id or "")
    return study, parent.run_id


def summarize(study, model: str, parent_run_id: str | None) -> dict:
    import optuna

    states = [t.state for t in study.get_trials(deepcopy=False)]
    counts = {s.name: states.count(s) for s in optuna.trial.TrialState if states.count(s)}
    out = {"study": study.study_name, "model": model, "trials": len(states), "states": counts}
    if counts.get("COMPLETE"):
        best = study.best_trial
        out.update(
            best_trial=best.number,
            best_value=best.value,
            params=best.params,
            overrides=overrides(model, best.params),
            command=exp_run_command(model, best.params, counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)),
        )
    if parent_run_id:  # the parent run shows the study as it stands after this worker
        run = tracking.Run.resume(parent_run_id)
        run.log_metrics(
            {"trials": len(states), **({"best_value": out["best_value"]} if "best_value" in out else {})}, step=len(states)
        )
        run.set_tags(
            {
                "best_trial": out.get("best_trial", ""),
                "best_overrides": " ".join(out.get("overrides", [])),
                "trial_states": json.dumps(counts),
            }
        )
        run.end("FINISHED")
    return out
