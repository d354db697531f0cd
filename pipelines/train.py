"""Stage train@<model>: train one model with the shared harness, log it to MLflow, write models/<model>/.

Usage: python pipelines/train.py {ae,vae,gan,wgan}
Reads params sections `train` (shared run settings) and `models.<model>`.
"""
import csv
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from mnistgen import data, figures, tracking, training  # noqa: E402
from mnistgen.config import ModelParams, RunParams, flatten, load_section  # noqa: E402
from mnistgen.models import FAMILIES, build_model  # noqa: E402
from mnistgen.utils import StageError, atomic_dir, pick_device, run_stage, seed_everything, sha256_json  # noqa: E402

PREPARED = Path("data/prepared")
LIBRARY = Path(__file__).resolve().parents[1] / "src" / "mnistgen"


def code_hash() -> str:
    """A checkpoint made by other library code must not be resumed: the code is part of its fingerprint."""
    return sha256_json({str(p.relative_to(LIBRARY)): p.read_text() for p in sorted(LIBRARY.rglob("*.py"))})


def write_curves(history: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[-1]))
        writer.writeheader()
        writer.writerows(history)


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in FAMILIES:
        raise StageError(f"usage: python pipelines/train.py {{{','.join(FAMILIES)}}}")
    name = sys.argv[1]
    started = time.perf_counter()
    run_params = load_section(RunParams, "train")
    params = load_section(ModelParams, f"models.{name}")
    device = pick_device(run_params.device)
    seed_everything(run_params.seed, run_params.deterministic)
    data_hash = tracking.data_hash(PREPARED)
    params_hash = sha256_json({"train": dataclasses.asdict(run_params), "model": dataclasses.asdict(params)})
    run = tracking.Run.start(run_params.experiment, run_name=name, tags={  # fails here if MLflow is unreachable
        "model": name, "stage": "train", "git_commit": tracking.git_commit(), "data_hash": data_hash,
        "params_hash": params_hash, "device": str(device), "torch_version": torch.__version__,
    })
    run.log_params(flatten({"train": run_params, "model": params}))

    train_images = data.to_float(data.load_split(PREPARED, "train").images, device)
    val_images = data.to_float(data.load_split(PREPARED, "val").images, device)
    model = build_model(params).to(device)
    fixed_noise = torch.randn(64, params.latent_dim, generator=torch.Generator().manual_seed(run_params.seed)).to(device)
    out = Path("models") / name
    grids = Path("checkpoints") / name / "grids"

    logged_epochs: set[int] = set()

    def on_epoch(epoch: int, metrics: dict, model) -> None:
        run.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        logged_epochs.add(epoch)
        if epoch % run_params.sample_every == 0 or epoch == params.epochs:
            model.eval()
            with torch.no_grad():
                grid = figures.save_grid(model.decode(fixed_noise), grids / f"samples_epoch_{epoch:03d}.png")
            model.train()
            run.log_artifact(grid, "samples")

    checkpoint = training.Checkpoint(Path("checkpoints") / name / "last.pt", {
        "params": params_hash, "data": data_hash, "images": len(train_images), "code": code_hash(),
    })
    try:
        history = training.train(
            model, train_images, val_images, epochs=params.epochs, batch_size=params.batch_size,
            seed=run_params.seed, checkpoint=checkpoint, on_epoch=on_epoch,
        )
    except BaseException:
        run.end("FAILED")
        raise
    for row in history:  # epochs trained before a resume, logged into this run too
        if row["epoch"] not in logged_epochs:
            run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])

    with atomic_dir(out) as tmp:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp / "weights.pt")
        (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(params), indent=2) + "\n")
        write_curves(history, tmp / "curves.csv")
        figures.plot_curves(history, tmp / "curves.png", f"{name} training curves")
        with torch.no_grad():
            figures.save_grid(model.sample(64, torch.Generator(device=device).manual_seed(run_params.seed)), tmp / "samples.png")
        run.log_artifact(tmp / "curves.png", "figures")
        run.log_artifact(tmp / "samples.png", "figures")
        example = fixed_noise[:2].cpu().numpy()
        model_uri = run.log_generator(tmp / "weights.pt", tmp / "config.json", params.latent_dim, example)
        tracking.write_run_file(tmp / "run.json", run, model_uri)
    run.end()
    last = history[-1]
    print(f"train {name}: {params.epochs} epochs in {time.perf_counter() - started:.0f} s on {device}, "
          f"val_{'loss' if 'val_loss' in last else 'g_loss'} {last.get('val_loss', last.get('val_g_loss')):.4g}, run {run.run_id}")


if __name__ == "__main__":
    run_stage(main)
