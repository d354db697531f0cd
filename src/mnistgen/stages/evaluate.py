"""Stage evaluate@<model>: every metric of the protocol for one model, in both evaluator feature
spaces, its figures, and the same numbers logged into the model's MLflow training run.

Usage: python -m mnistgen.stages.evaluate <model> --data data/prepared --evaluator models/evaluator
       --model-dir models/<model> --figures evaluation/<model> --metrics metrics/<model>.json   (paths from dvc.yaml)
"""

import argparse
import json
import time
from pathlib import Path

import torch

from mnistgen import data, evaluation, evaluators, tracking
from mnistgen.config import EvaluateParams, load_section
from mnistgen.models import GenerativeModel, build_model, model_params
from mnistgen.utils import StageError, atomic_dir, pick_device, run_stage, write_json


def load_trained(folder: Path, device: torch.device) -> GenerativeModel:
    try:
        params = model_params(json.loads((folder / "config.json").read_text()), f"{folder}/config.json")
        model = build_model(params)
        model.load_state_dict(torch.load(folder / "weights.pt", map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, json.JSONDecodeError) as err:
        raise StageError(f"{folder}: cannot load the trained model ({err}); run `dvc repro train@{folder.name}`") from err
    return model.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    for flag in ("--data", "--evaluator", "--model-dir", "--figures", "--metrics"):
        parser.add_argument(flag, type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    params = load_section(EvaluateParams, "evaluate")
    device = pick_device("auto")
    run = tracking.Run.resume(tracking.read_run_file(args.model_dir / "run.json").get("run_id"))
    torch.manual_seed(params.seed)

    try:
        classifiers = evaluators.load_classifiers(args.evaluator, device)
    except (OSError, RuntimeError, KeyError, json.JSONDecodeError) as err:
        raise StageError(f"{args.evaluator}: cannot load the evaluators ({err}); run `dvc repro train_evaluator`") from err
    refs = evaluation.load_references(args.evaluator, device)
    test, val = data.load_split(args.data, "test"), data.load_split(args.data, "val")
    test_x, test_y = data.to_float(test.images, device), test.labels.to(device)
    val_x, val_y = data.to_float(val.images, device), val.labels.to(device)
    model = load_trained(args.model_dir, device)

    with atomic_dir(args.figures) as figures_dir:
        job = evaluation.Evaluation(model, classifiers, refs, params, figures_dir)
        results: dict[str, float | str] = dict(job.run(test_x, test_y, val_x, val_y))
        hashes = {f"evaluator_hash{suffix}": ref.evaluator_hash for suffix, ref in refs.items()}
        results.update(hashes)
        write_json(args.metrics, {k: results[k] for k in sorted(results)})  # no timings: the report and promote depend on it
        run.log_metrics({f"eval_{k}": v for k, v in results.items() if isinstance(v, (int, float))})
        run.log_metrics({"eval_seconds": time.perf_counter() - started})
        run.set_tags(hashes)
        run.log_artifacts(figures_dir, "evaluation")
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in job.timings.items())
    headline = (
        f"FID_cls {results['fid_cls']:.2f} [{results['fid_cls_lo']:.2f}, {results['fid_cls_hi']:.2f}] "
        f"(evaluator 2: {results['fid_cls_e2']:.2f}), IS_cls {results['is_cls']:.2f}, "
        f"precision {results['precision']:.3f}, recall {results['recall']:.3f}, gradient magnitude {results['grad_mag']:.4f}"
    )
    print(f"evaluate {args.model}: {headline} ({timings}; total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    run_stage(main)
