"""Stage train@<model>: train one model with the shared harness, log it to MLflow, write its folder.

Usage: python -m mnistgen.stages.train <model> --data data/prepared --out models/<model> --curves curves/<model>
(paths come from dvc.yaml). Reads params sections `train` (shared run settings) and `models.<model>`.
Writes weights.pt, config.json, run.json and samples.png to --out, and one CSV per training curve
(epoch, train, val) plus curves.png to --curves, which `dvc plots show` draws.

Data-parallel: `torchrun --standalone --nproc_per_node N -m mnistgen.stages.train <model> ...` trains on N
processes (gloo on CPU, NCCL on CUDA), each on its slice of every global batch; rank 0 alone logs to MLflow and writes the outputs and checkpoints (mnistgen.distributed).
"""

import argparse
import contextlib
import csv
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mnistgen import data, distributed, figures, grades, tracking, training
from mnistgen.config import ModelParams, RunParams, flatten, load_section, read_params
from mnistgen.models import build_model, load_model_params
from mnistgen.utils import StageError, atomic_dir, pick_device, run_stage, seed_everything, sha256_json, training_dtype

NOT_CURVES = {"epoch", "epoch_seconds", "images_per_second"}


def write_curves(history: list[dict], folder: Path) -> None:
    """One CSV per training metric with its validation twin beside it: epoch, train[, val]."""
    for key in [k for k in history[0] if k not in NOT_CURVES and not k.startswith("val_")]:
        columns = ["train"] + (["val"] if f"val_{key}" in history[0] else [])
        with open(folder / f"{key}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["epoch", *columns])
            writer.writerows([row["epoch"], row[key], *([row[f"val_{key}"]] if "val" in columns else [])] for row in history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--curves", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    run_params = load_section(RunParams, "train")
    params = load_model_params(args.model)
    with distributed.session(pick_device(run_params.device), run_params.dist_timeout_s) as device:
        seed_everything(run_params.seed, run_params.deterministic)
        stage = Stage(args.model, run_params, params, device, args.data)
        # One MLflow run for the whole stage: it ends FAILED if anything below raises (training, a figure, the logged
        # model). Under torchrun only rank 0 has a run: the others train and stop before the outputs.
        with stage.start_run() as run:
            if distributed.is_main():
                run.log_params(flatten({"train": run_params, "model": params}))
            history = stage.train(run)
            if distributed.is_main():
                stage.log_history(run, history)
                stage.write_outputs(run, history, args.out, args.curves)
                print(
                    f"train {args.model}: {params.epochs} epochs in {time.perf_counter() - started:.0f} s on {device} "
                    f"({torch.get_num_threads()} threads), "
                    f"{final_loss(history[-1])}, run {run.run_id}"
                )


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo, else what platform knows): training seconds depend on it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def host_tags() -> dict[str, str]:
    """Where the seconds were measured: the CPU, the CPUs this process may use, and the threads torch uses of
    them. torch starts one thread per physical core, so where two logical CPUs share a core it uses one."""
    return {"cpu": cpu_name(), "cpus": str(len(os.sched_getaffinity(0))), "torch_threads": str(torch.get_num_threads())}


def selected_from() -> int:
    """How many trials this run's params were chosen among (MNISTGEN_SELECTED_FROM, which `mnistgen sweep` prints in
    its `dvc exp run` line; 1 when unset): the gate re-measures such a candidate on fresh samples."""
    text = os.environ.get("MNISTGEN_SELECTED_FROM", "1").strip() or "1"
    if not text.isdigit() or int(text) < 1:
        raise StageError(f"MNISTGEN_SELECTED_FROM: a count of trials (1 or more), got {text!r}")
    return int(text)


def final_loss(last: dict) -> str:
    key = "val_loss" if "val_loss" in last else "val_g_loss"
    return f"{key} {last[key]:.4g}"


@dataclass
class Stage:
    name: str
    run_params: RunParams
    params: ModelParams
    device: torch.device
    data: Path

    def __post_init__(self):
        subset = {k: v for k, v in json.loads((self.data / "meta.json").read_text())["params"].items() if k.startswith("limit_")}
        if self.run_params.grade != "smoke" and any(subset.values()):
            raise StageError(
                f"params.yaml: train.grade is {self.run_params.grade!r}, but {self.data} is a subset ({subset}): a subset run "
                "is graded smoke (params-smoke.yaml)"
            )
        self.data_hash = tracking.data_hash(self.data)
        self.params_hash = sha256_json({"train": self.run_params.model_dump(), "model": self.params.model_dump()})
        self.fixed_noise = torch.randn(64, self.params.latent_dim, generator=torch.Generator().manual_seed(self.run_params.seed))
        self.fixed_noise = self.fixed_noise.to(self.device)
        self.fixed_labels = torch.arange(64, device=self.device) % 10  # conditional families: digits 0..9 in turn
        self.logged_epochs: set[int] = set()

    def start_run(self):
        """The stage's MLflow run on rank 0 (fails here if MLflow is unreachable); nothing on the other ranks."""
        if not distributed.is_main():
            return contextlib.nullcontext()
        tags = {
            "model": self.name,
            "family": self.params.family,
            "stage": "train",
            "git_commit": tracking.git_commit(),
            "data_hash": self.data_hash,
            "params_hash": self.params_hash,
            "grade": self.run_params.grade,  # claimed: promotion grades the run by its recipe (mnistgen.grades)
            "recipe": grades.recipe_hash(read_params(), self.name),
            "selected_from": str(selected_from()),
            "device": str(self.device),
            "precision": str(training_dtype(self.device, self.params.precision)).removeprefix("torch."),
            "torch_version": torch.__version__,
            **host_tags(),
        }
        if distributed.world_size() > 1:
            tags["world_size"] = str(distributed.world_size())
        return tracking.Run.start(self.run_params.experiment, run_name=self.name, tags=tags)

    def train(self, run) -> list[dict]:
        """The model trained by the one loop, resuming from its checkpoint; every rank holds the whole
        training set on the device and trains on its slice of each global batch."""
        train_split, val_split = data.load_split(self.data, "train"), data.load_split(self.data, "val")
        train_images, val_images = data.to_float(train_split.images, self.device), data.to_float(val_split.images, self.device)
        self.model = build_model(self.params).to(self.device)
        # "The code" in the fingerprint is every mnistgen module this stage imported: what dvc.yaml lists as its deps.
        checkpoint = training.Checkpoint(
            Path("checkpoints") / self.name / "last.pt",
            {
                "params": self.params_hash,
                "data": self.data_hash,
                "images": len(train_images),
                "code": sha256_json(training.library_code()),
            },
        )
        if self.params.ema_decay > 0 and distributed.is_main():  # what the warm-up lets the average reach in this run
            steps = training.batches(len(train_images), self.params.batch_size) * self.params.epochs
            run.log_params({"ema_effective_decay": round(training.effective_decay(self.params.ema_decay, steps), 6)})
        return training.train(
            self.model,
            train_images,
            val_images,
            seed=self.run_params.seed,
            checkpoint=checkpoint,
            on_epoch=lambda epoch, metrics, model: self.on_epoch(run, epoch, metrics, model),
            train_labels=train_split.labels.to(self.device),
            val_labels=val_split.labels.to(self.device),
        )

    def fixed_samples(self, model) -> torch.Tensor:
        if model.conditional:
            return model.decode_noise(self.fixed_noise, self.fixed_labels)
        return model.decode(self.fixed_noise)

    def on_epoch(self, run, epoch: int, metrics: dict, model) -> None:
        """Each epoch's metrics, and every sample_every-th epoch a grid of the fixed noise, to MLflow."""
        run.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        self.logged_epochs.add(epoch)
        if epoch % self.run_params.sample_every == 0 or epoch == self.params.epochs:
            model.eval()
            with torch.no_grad():
                grid = figures.save_grid(
                    self.fixed_samples(model), Path("checkpoints") / self.name / "grids" / f"samples_epoch_{epoch:03d}.png"
                )
            model.train()
            run.log_artifact(grid, "samples")

    def log_history(self, run, history: list[dict]) -> None:
        """Epochs trained before a resume, logged into this run too."""
        for row in history:
            if row["epoch"] not in self.logged_epochs:
                run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])

    def write_outputs(self, run, history: list[dict], out: Path, curves: Path) -> None:
        """The curves folder and the model folder (weights, config, samples, run.json), each whole or not at all,
        and the logged model."""
        model = self.model
        with atomic_dir(curves) as curves_dir, atomic_dir(out) as tmp:
            write_curves(history, curves_dir)
            figures.plot_curves(history, curves_dir / "curves.png", f"{self.name} training curves")
            run.log_artifact(curves_dir / "curves.png", "figures")
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp / "weights.pt")
            (tmp / "config.json").write_text(self.params.model_dump_json(indent=2) + "\n")
            with torch.no_grad():
                samples = model.sample(64, torch.Generator(device=self.device).manual_seed(self.run_params.seed))
            figures.save_grid(samples, tmp / "samples.png")
            run.log_artifact(tmp / "samples.png", "figures")
            example = self.fixed_noise[:2].cpu()
            if model.conditional:  # a conditional model's input row is the noise and then the digit
                example = torch.cat([example, self.fixed_labels[:2, None].cpu().float()], dim=1)
            model_uri = run.log_generator(
                tmp / "weights.pt", tmp / "config.json", self.params.latent_dim, example.numpy(), conditional=model.conditional
            )
            tracking.write_run_file(tmp / "run.json", run, model_uri)


if __name__ == "__main__":
    run_stage(main)
