"""Stage train@<model>: train one model with the shared harness, log it to MLflow, write its folder.

Usage: python pipelines/train.py <model> --data data/prepared --out models/<model> --curves curves/<model>
(paths come from dvc.yaml). Reads params sections `train` (shared run settings) and `models.<model>`.
Writes weights.pt, config.json, run.json and samples.png to --out, and one CSV per training curve
(epoch, train, val) plus curves.png to --curves, which `dvc plots show` draws.

Data-parallel: `torchrun --standalone --nproc_per_node N pipelines/train.py <model> ...` trains on N
processes (gloo on CPU, NCCL on CUDA), each on its slice of every global batch; rank 0 alone logs to MLflow and writes the outputs and checkpoints (mnistgen.distributed).
"""

import argparse
import contextlib
import csv
import time
from pathlib import Path

import torch

from mnistgen import data, distributed, figures, tracking, training
from mnistgen.config import RunParams, flatten, load_section
from mnistgen.models import build_model, load_model_params
from mnistgen.utils import atomic_dir, pick_device, run_stage, seed_everything, sha256_json

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
    name = args.model
    started = time.perf_counter()
    run_params = load_section(RunParams, "train")
    params = load_model_params(name)
    with distributed.session(pick_device(run_params.device), run_params.dist_timeout_s) as device:
        train_stage(args, run_params, params, device, started)


def train_stage(args, run_params, params, device, started) -> None:
    name = args.model
    seed_everything(run_params.seed, run_params.deterministic)
    data_hash = tracking.data_hash(args.data)
    params_hash = sha256_json({"train": run_params.model_dump(), "model": params.model_dump()})
    # One MLflow run for the whole stage: it ends FAILED if anything below raises (training, a figure, the logged model).
    # Under torchrun only rank 0 has a run: the others train and stop before the outputs.
    main_rank = distributed.is_main()
    with (
        tracking.Run.start(
            run_params.experiment,
            run_name=name,
            tags={  # fails here if MLflow is unreachable
                "model": name,
                "family": params.family,
                "stage": "train",
                "git_commit": tracking.git_commit(),
                "data_hash": data_hash,
                "params_hash": params_hash,
                "device": str(device),
                "torch_version": torch.__version__,
                **({"world_size": str(distributed.world_size())} if distributed.world_size() > 1 else {}),
            },
        )
        if main_rank
        else contextlib.nullcontext() as run
    ):
        if main_rank:
            run.log_params(flatten({"train": run_params, "model": params}))

        train_split, val_split = data.load_split(args.data, "train"), data.load_split(args.data, "val")
        # Every rank holds the whole training set on the device and trains on its slice of each global batch.
        train_images, val_images = data.to_float(train_split.images, device), data.to_float(val_split.images, device)
        train_labels, val_labels = train_split.labels.to(device), val_split.labels.to(device)  # conditional families
        model = build_model(params).to(device)
        fixed_noise = torch.randn(64, params.latent_dim, generator=torch.Generator().manual_seed(run_params.seed)).to(device)
        fixed_labels = torch.arange(64, device=device) % 10  # conditional families: digits 0..9 in turn

        def fixed_samples(model) -> torch.Tensor:
            return model.decode_noise(fixed_noise, fixed_labels) if model.conditional else model.decode(fixed_noise)

        grids = Path("checkpoints") / name / "grids"
        logged_epochs: set[int] = set()

        def on_epoch(epoch: int, metrics: dict, model) -> None:
            run.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
            logged_epochs.add(epoch)
            if epoch % run_params.sample_every == 0 or epoch == params.epochs:
                model.eval()
                with torch.no_grad():
                    grid = figures.save_grid(fixed_samples(model), grids / f"samples_epoch_{epoch:03d}.png")
                model.train()
                run.log_artifact(grid, "samples")

        # "The code" in the fingerprint is every mnistgen module this stage imported: what dvc.yaml lists as its deps.
        checkpoint = training.Checkpoint(
            Path("checkpoints") / name / "last.pt",
            {
                "params": params_hash,
                "data": data_hash,
                "images": len(train_images),
                "code": sha256_json(training.library_code()),
                **(
                    {"world_size": distributed.world_size()} if distributed.world_size() > 1 else {}
                ),  # the batches differ with it
            },
        )
        history = training.train(
            model,
            train_images,
            val_images,
            seed=run_params.seed,
            checkpoint=checkpoint,
            on_epoch=on_epoch,
            train_labels=train_labels,
            val_labels=val_labels,
        )
        if not main_rank:
            return
        for row in history:  # epochs trained before a resume, logged into this run too
            if row["epoch"] not in logged_epochs:
                run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])

        with atomic_dir(args.curves) as curves_dir:
            write_curves(history, curves_dir)
            figures.plot_curves(history, curves_dir / "curves.png", f"{name} training curves")
            run.log_artifact(curves_dir / "curves.png", "figures")
            with atomic_dir(args.out) as tmp:
                torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp / "weights.pt")
                (tmp / "config.json").write_text(params.model_dump_json(indent=2) + "\n")
                with torch.no_grad():
                    figures.save_grid(
                        model.sample(64, torch.Generator(device=device).manual_seed(run_params.seed)), tmp / "samples.png"
                    )
                run.log_artifact(tmp / "samples.png", "figures")
                example = fixed_noise[:2].cpu()
                if model.conditional:  # a conditional model's input row is the noise and then the digit
                    example = torch.cat([example, fixed_labels[:2, None].cpu().float()], dim=1)
                model_uri = run.log_generator(
                    tmp / "weights.pt", tmp / "config.json", params.latent_dim, example.numpy(), conditional=model.conditional
                )
                tracking.write_run_file(tmp / "run.json", run, model_uri)
    last = history[-1]
    print(
        f"train {name}: {params.epochs} epochs in {time.perf_counter() - started:.0f} s on {device}, "
        f"val_{'loss' if 'val_loss' in last else 'g_loss'} {last.get('val_loss', last.get('val_g_loss')):.4g}, run {run.run_id}"
    )


if __name__ == "__main__":
    run_stage(main)
