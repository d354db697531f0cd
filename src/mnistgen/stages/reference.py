"""Stage reference: the pinned evaluators' features of the real images that every metric compares with.

The evaluators (two MNIST classifiers of different architecture and seed, two feature spaces)
are the ruler of every FID_cls, KID_cls, precision and IS_cls. They are not trained here: they
are a pinned, versioned artifact (params `evaluate.evaluators`, e.g. evaluators/v1, whose
manifest pins each weight file's sha256), so a fresh clone on any CPU measures with the same
weights. A new ruler is an explicit act, `mnistgen evaluator train`, which writes a new version.

Writes the evaluator folder (per space: the weights, and reference features of the validation
split, of the test split and of a training subset; spaces.json names the files and hashes) and
metrics/evaluator.json (accuracies and hashes). Validation accuracy is checked against each
space's min_val_accuracy: a ruler that does not read this data fails here, not in a metric.

Usage: python -m mnistgen.stages.reference --data data/prepared --evaluators evaluators/v1 --out models/evaluator --metrics metrics/evaluator.json
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from mnistgen import data
from mnistgen.config import EvaluatorParams, ReferenceParams, load_section
from mnistgen.evaluators import FEATURE_SPACES, SPACES_FILE, accuracy, load_classifier, read_pinned
from mnistgen.utils import StageError, atomic_dir, evaluation_device, run_stage, write_json


@data.reads_test("reference")  # one of the readers of the test split (data.TEST_READERS)
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for flag in ("--data", "--evaluators", "--out", "--metrics"):
        parser.add_argument(flag, type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    reference = load_section(ReferenceParams, "evaluate")
    device = evaluation_device()
    pinned = read_pinned(args.evaluators)
    splits = {name: data.load_split(args.data, name) for name in ("train", "val", "test")}
    images = {name: data.to_float(split.images, device) for name, split in splits.items()}
    labels = {name: split.labels.to(device) for name, split in splits.items()}
    n_real = min(reference.num_real, len(images["train"]))
    subset = torch.randperm(len(images["train"]), generator=torch.Generator().manual_seed(reference.seed))[:n_real]

    summary: dict[str, float | str] = {"version": pinned["version"]}
    spaces = []
    with atomic_dir(args.out) as tmp:
        for space, entry in zip(FEATURE_SPACES, pinned["spaces"], strict=True):
            suffix = space.suffix
            model = load_classifier(args.evaluators / entry["classifier"], entry["arch"], entry["width"], device)
            val_accuracy = accuracy(model, images["val"], labels["val"])
            minimum = EvaluatorParams.model_validate(entry["recipe"]).min_val_accuracy
            if val_accuracy < minimum:
                raise StageError(
                    f"{args.evaluators}: the {space.name} reads this data's validation split at {val_accuracy:.4f}, "
                    f"below its min_val_accuracy {minimum}"
                )
            shutil.copyfile(args.evaluators / entry["classifier"], tmp / entry["classifier"])
            features = {"evaluator_hash": entry["evaluator_hash"]}
            for name, rows in (
                ("val", images["val"]),
                ("test", images["test"][: reference.num_real]),
                ("train", images["train"][subset.to(device)]),
            ):
                feats, probs = model.features_and_probs(rows)
                features.update({f"{name}_feats": feats.cpu(), f"{name}_probs": probs.cpu()})
            torch.save(features, tmp / f"reference{space.files}.pt")
            spaces.append({**entry, "reference": f"reference{space.files}.pt", "val_accuracy": val_accuracy})
            summary.update(
                {
                    f"val_accuracy{suffix}": val_accuracy,
                    f"test_accuracy{suffix}": accuracy(model, images["test"], labels["test"]),  # shown by the report only
                    f"evaluator_hash{suffix}": entry["evaluator_hash"],
                }
            )
        (tmp / SPACES_FILE).write_text(json.dumps(spaces, indent=2) + "\n")
    write_json(args.metrics, summary)
    print(
        f"reference: pinned evaluators {pinned['version']} ({args.evaluators}), validation accuracy "
        + ", ".join(f"{s['val_accuracy']:.4f} ({s['arch']}, hash {s['evaluator_hash'][:12]})" for s in spaces)
        + f"; {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    run_stage(main)
