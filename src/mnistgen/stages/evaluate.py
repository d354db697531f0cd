"""Stage evaluate@<model>: every metric of the protocol for one model, on the validation split and on the
test split, in both evaluator feature spaces, its figures, and the same numbers logged into the model's
MLflow training run.

Each split has one role: metrics/val/<model>.json is what choices read (the promotion gate), and
metrics/test/<model>.json is read only by the final report. Both come from the same samples. The
validation measurement carries its protocol and fingerprint (evaluation.protocol), and its per-sample
and per-image values (evidence.pt) from which the gate makes a paired comparison with the champion.

Usage: python -m mnistgen.stages.evaluate <model> --data data/prepared --evaluator models/evaluator
       --model-dir models/<model> --figures evaluation/<model> --metrics metrics   (paths from dvc.yaml)
"""

import argparse
import json
import time
from pathlib import Path

import torch

from mnistgen import data, evaluation, tracking
from mnistgen.config import EvaluateParams, load_section
from mnistgen.models import load_trained
from mnistgen.utils import StageError, atomic_dir, evaluation_device, run_stage, write_json


@data.reads_test("evaluate")  # one of the readers of the test split (data.TEST_READERS)
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    for flag in ("--data", "--evaluator", "--model-dir", "--figures", "--metrics"):
        parser.add_argument(flag, type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    params = load_section(EvaluateParams, "evaluate")
    device = evaluation_device()
    run = tracking.Run.resume(tracking.read_run_file(args.model_dir / "run.json").get("run_id"))
    try:
        model = load_trained(args.model_dir, device)
    except StageError as err:
        raise StageError(f"{err}; run `dvc repro train@{args.model}`") from err

    with atomic_dir(args.figures) as figures_dir:
        timings: dict[str, float] = {}  # where the seconds go, per split and part: MLflow and stdout only
        results, evidence = evaluation.measure(model, args.evaluator, args.data, params, device, figures_dir, timings=timings)
        torch.save(evidence, figures_dir / evaluation.EVIDENCE)
        for split, measured in results.items():  # no timings: the report and promote depend on these files
            write_json(args.metrics / split / f"{args.model}.json", {k: measured[k] for k in sorted(measured)})
            run.log_metrics({f"{split}_{k}": v for k, v in measured.items() if isinstance(v, (int, float))})
        run.log_metrics({"eval_seconds": time.perf_counter() - started, **{f"eval_seconds_{k}": v for k, v in timings.items()}})
        run.set_tags({k: v for k, v in results["val"].items() if k.startswith("evaluator_hash")})
        run.set_tags({"protocol": results["val"]["protocol"], "protocol_json": json.dumps(evidence["protocol"], sort_keys=True)})
        run.log_artifacts(figures_dir, "evaluation")
    for split, r in results.items():
        print(
            f"evaluate {args.model} on {split}: FID_cls {r['fid_cls']:.2f} [{r['fid_cls_lo']:.2f}, {r['fid_cls_hi']:.2f}] "
            f"(evaluator 2: {r['fid_cls_e2']:.2f}), IS_cls {r['is_cls']:.2f}, precision {r['precision']:.3f}, "
            f"recall {r['recall']:.3f}" + (f", IWAE NLL {r['iwae_nll']:.2f}" if "iwae_nll" in r else "")
        )
    parts = ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
    print(f"evaluate {args.model}: protocol {results['val']['protocol']}; {time.perf_counter() - started:.0f} s ({parts})")


if __name__ == "__main__":
    run_stage(main)
