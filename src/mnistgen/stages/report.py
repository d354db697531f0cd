"""Stage report: one comparison of every model and the real-data floor, as markdown and HTML.

The report is the one reader of the test split's figures: it reads metrics/test/, nothing that
chooses reads them (the gate reads metrics/val/).

The models are the keys of params.yaml's `models` section; the real-data column scores each
evaluator's training-image reference features against its test features with the same
protocol as a model's samples (bands included), and measures the sharpness of the reference
test digits (the first `evaluate.num_real` test images).

It also writes README.md's results table, between its markers: the figures a user sees first are the report's.

Usage: python -m mnistgen.stages.report --metrics metrics/test --evaluator-metrics metrics/evaluator.json --seeds metrics/seeds --figures evaluation
       --curves curves --evaluator models/evaluator --data data/prepared --out reports --readme README.md   (paths from dvc.yaml)
"""

import argparse
import csv
import json
from pathlib import Path

import torch

from mnistgen import data, evaluation, metrics, report
from mnistgen.config import EvaluateParams, load_section, model_names
from mnistgen.utils import StageError, atomic_write_text, run_stage, write_json


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StageError(f"{path}: cannot read ({err})") from err


def read_curves(folder: Path) -> dict[str, list[float]]:
    """{metric: training values per epoch} from train's curve CSVs."""
    curves = {}
    for path in sorted(folder.glob("*.csv")):
        with open(path, newline="") as f:
            curves[path.stem] = [float(row["train"]) for row in csv.DictReader(f)]
    return curves


@data.reads_test("report")  # one of the readers of the test split (data.TEST_READERS)
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for flag in (
        "--metrics",
        "--evaluator-metrics",
        "--seeds",
        "--figures",
        "--curves",
        "--evaluator",
        "--data",
        "--out",
        "--readme",
    ):
        parser.add_argument(flag, type=Path, required=True)
    args = parser.parse_args()
    models = model_names()
    params = load_section(EvaluateParams, "evaluate")
    seeds = {m: read_json(args.seeds / f"{m}.json") for m in models if (args.seeds / f"{m}.json").exists()}
    results = report.with_seed_spread({m: read_json(args.metrics / f"{m}.json") for m in models}, seeds)
    evaluator = read_json(args.evaluator_metrics)
    refs = evaluation.load_references(args.evaluator, "test")
    real = evaluation.real_data_row(refs, params)
    test = data.load_split(args.data, "test")
    real.update(metrics.sharpness(data.to_float(test.images[: params.num_real], torch.device("cpu")), params.batch_size))
    curves = {m: read_curves(args.curves / m) for m in models}
    checks = report.claims(results, curves)
    figures = {
        m: [p for name in report.FIGURES if (p := args.figures / m / name).exists()] + [args.curves / m / "curves.png"]
        for m in models
    }
    try:
        readme = report.with_results_table(args.readme.read_text(), report.headline_table(results), str(args.readme))
    except (OSError, ValueError) as err:
        raise StageError(f"{args.readme}: cannot write the results table ({err})") from err
    write_json(args.out / "real_data.json", real)
    atomic_write_text(args.readme, readme)
    atomic_write_text(args.out / "comparison.md", report.build_markdown(results, real, evaluator, checks))
    atomic_write_text(args.out / "comparison.html", report.build_html(results, real, checks, figures, evaluator))
    held = sum(v == report.HOLDS for _, v, _ in checks)
    close = sum(v == report.TOO_CLOSE for _, v, _ in checks)
    agreement = ", ".join(f"{k} {v:+.2f}" for k, v in report.rank_agreement(results).items())
    print(
        f"report: {held}/{len(checks)} of the design's claims hold"
        + (f", {close} too close to call" if close else "")
        + f"; real-data FID_cls floor {real['fid_cls']:.3f}; rank agreement of the two spaces (Kendall tau) {agreement}; "
        f"{args.out}/comparison.md and comparison.html"
    )


if __name__ == "__main__":
    run_stage(main)
