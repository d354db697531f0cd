"""Stage evaluate@<model>: every metric of DVC's protocol for one model, its figures, and the
same numbers logged into the model's MLflow training run.

Usage: python pipelines/evaluate.py {ae,vae,gan,wgan}
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from mnistgen import data, evaluation, tracking  # noqa: E402
from mnistgen.config import EvaluateParams, ModelParams, from_dict, load_section  # noqa: E402
from mnistgen.models import FAMILIES, build_model  # noqa: E402
from mnistgen.models.classifier import Classifier  # noqa: E402
from mnistgen.utils import StageError, atomic_dir, pick_device, run_stage, write_json  # noqa: E402

EVALUATOR = Path("models/evaluator")


def load_trained(name: str, device) -> torch.nn.Module:
    folder = Path("models") / name
    try:
        params = from_dict(ModelParams, json.loads((folder / "config.json").read_text()), f"{folder}/config.json")
        model = build_model(params)
        model.load_state_dict(torch.load(folder / "weights.pt", map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, json.JSONDecodeError) as err:
        raise StageError(f"{folder}: cannot load the trained model ({err}); run `dvc repro train@{name}`") from err
    return model.to(device).eval()


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in FAMILIES:
        raise StageError(f"usage: python pipelines/evaluate.py {{{','.join(FAMILIES)}}}")
    name = sys.argv[1]
    started = time.perf_counter()
    params = load_section(EvaluateParams, "evaluate")
    device = pick_device("auto")
    run = tracking.Run.resume(tracking.read_run_file(Path("models") / name / "run.json").get("run_id"))
    torch.manual_seed(params.seed)

    classifier = Classifier()
    classifier.load_state_dict(torch.load(EVALUATOR / "classifier.pt", map_location="cpu", weights_only=True))
    classifier.to(device).eval()
    ref = evaluation.Reference(**torch.load(EVALUATOR / "reference.pt", map_location=device, weights_only=True))
    test = data.load_split("data/prepared", "test")
    test_x, test_y = data.to_float(test.images, device), test.labels.to(device)
    model = load_trained(name, device)

    with atomic_dir(Path("reports") / name) as figures_dir:
        job = evaluation.Evaluation(model, classifier, ref, params, figures_dir)
        results = job.run(test_x, test_y)
        results["evaluator_hash"] = ref.evaluator_hash
        results["eval_seconds"] = time.perf_counter() - started
        write_json(Path("metrics") / f"{name}.json", {k: results[k] for k in sorted(results)})
        run.log_metrics({f"eval_{k}": v for k, v in results.items() if k != "evaluator_hash"})
        run.set_tags({"evaluator_hash": ref.evaluator_hash})
        run.log_artifacts(figures_dir, "evaluation")
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in job.timings.items())
    headline = f"FID_cls {results['fid_cls']:.2f}, IS_cls {results['is_cls']:.2f}, precision {results['precision']:.3f}, recall {results['recall']:.3f}"
    print(f"evaluate {name}: {headline} ({timings}; total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    run_stage(main)
