"""Stage train_evaluator: the MNIST classifier whose features every sample-quality metric uses.

Writes the evaluator folder (weights, reference features of the test set and of a training
subset, extracted once and reused by every evaluate@model stage and the report) and a
metrics file (test accuracy, checkpoint hash). Reads params `evaluator`, and of `evaluate`
only the keys that choose the reference images (`seed`, `num_real`).

Usage: python pipelines/train_evaluator.py --data data/prepared --out models/evaluator --metrics metrics/evaluator.json
"""
import argparse
import time
from pathlib import Path

import torch

from mnistgen import data
from mnistgen.config import EvaluatorParams, ReferenceParams, load_section
from mnistgen.evaluator import accuracy, train_classifier
from mnistgen.utils import StageError, atomic_dir, pick_device, run_stage, sha256_file, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    params = load_section(EvaluatorParams, "evaluator")
    reference = load_section(ReferenceParams, "evaluate")
    device = pick_device("auto")
    train, test = data.load_split(args.data, "train"), data.load_split(args.data, "test")
    train_x, train_y = data.to_float(train.images, device), train.labels.to(device)
    test_x, test_y = data.to_float(test.images, device), test.labels.to(device)

    model = train_classifier(train_x, train_y, params)
    test_accuracy = accuracy(model, test_x, test_y)
    if test_accuracy < params.min_test_accuracy:
        raise StageError(f"evaluator: test accuracy {test_accuracy:.4f} is below evaluator.min_test_accuracy {params.min_test_accuracy}")

    with atomic_dir(args.out) as tmp:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp / "classifier.pt")
        evaluator_hash = sha256_file(tmp / "classifier.pt")
        n_real = min(reference.num_real, len(train_x))
        subset = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(reference.seed))[:n_real]
        test_feats, test_probs = model.features_and_probs(test_x[: reference.num_real])
        train_feats, train_probs = model.features_and_probs(train_x[subset.to(device)])
        torch.save({"test_feats": test_feats.cpu(), "test_probs": test_probs.cpu(), "train_feats": train_feats.cpu(),
                    "train_probs": train_probs.cpu(), "evaluator_hash": evaluator_hash}, tmp / "reference.pt")
    write_json(args.metrics, {"test_accuracy": test_accuracy, "evaluator_hash": evaluator_hash})
    print(f"train_evaluator: test accuracy {test_accuracy:.4f}, hash {evaluator_hash[:12]}, {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    run_stage(main)
