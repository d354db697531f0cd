"""Stage train_evaluator: the MNIST classifiers whose features every sample-quality metric uses.

Two evaluators of different architecture and seed (params `evaluator` and `evaluator2`) give two
feature spaces. Writes the evaluator folder (per space: weights, and reference features of the
test set and of a training subset, extracted once and reused by every evaluate@model stage and
the report; spaces.json names the files, architectures and checkpoint hashes) and a metrics file
(test accuracies and checkpoint hashes; no timings, which would change the file on every run). Reads params `evaluator`, `evaluator2`, and
of `evaluate` only the keys that choose the reference images (`seed`, `num_real`).

Usage: python -m mnistgen.stages.train_evaluator --data data/prepared --out models/evaluator --metrics metrics/evaluator.json
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from mnistgen import data
from mnistgen.config import EvaluatorParams, ReferenceParams, load_section
from mnistgen.evaluators import FEATURE_SPACES, SPACES_FILE, accuracy, train_classifier
from mnistgen.utils import StageError, atomic_dir, pick_device, run_stage, sha256_file, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    params = {space.section: load_section(EvaluatorParams, space.section) for space in FEATURE_SPACES}
    reference = load_section(ReferenceParams, "evaluate")
    device = pick_device("auto")
    train, test = data.load_split(args.data, "train"), data.load_split(args.data, "test")
    train_x, train_y = data.to_float(train.images, device), train.labels.to(device)
    test_x, test_y = data.to_float(test.images, device), test.labels.to(device)
    n_real = min(reference.num_real, len(train_x))
    subset = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(reference.seed))[:n_real]

    trained = {}
    for space in FEATURE_SPACES:
        suffix, section = space.suffix, space.section
        clock = time.perf_counter()
        model = train_classifier(train_x, train_y, params[section])
        seconds = time.perf_counter() - clock
        test_accuracy = accuracy(model, test_x, test_y)
        if test_accuracy < params[section].min_test_accuracy:
            raise StageError(
                f"{section}: test accuracy {test_accuracy:.4f} is below {section}.min_test_accuracy {params[section].min_test_accuracy}"
            )
        trained[suffix] = (model, test_accuracy, seconds)

    summary: dict[str, float | str] = {}
    spaces: list[dict[str, Any]] = []
    with atomic_dir(args.out) as tmp:
        for space in FEATURE_SPACES:
            suffix, section, file_suffix = space.suffix, space.section, space.files
            model, test_accuracy, seconds = trained[suffix]
            weights, ref_file = f"classifier{file_suffix}.pt", f"reference{file_suffix}.pt"
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp / weights)
            evaluator_hash = sha256_file(tmp / weights)
            test_feats, test_probs = model.features_and_probs(test_x[: reference.num_real])
            train_feats, train_probs = model.features_and_probs(train_x[subset.to(device)])
            torch.save(
                {
                    "test_feats": test_feats.cpu(),
                    "test_probs": test_probs.cpu(),
                    "train_feats": train_feats.cpu(),
                    "train_probs": train_probs.cpu(),
                    "evaluator_hash": evaluator_hash,
                },
                tmp / ref_file,
            )
            spaces.append(
                {
                    "suffix": suffix,
                    "section": section,
                    "classifier": weights,
                    "reference": ref_file,
                    "arch": params[section].arch,
                    "width": params[section].width,
                    "seed": params[section].seed,
                    "evaluator_hash": evaluator_hash,
                    "test_accuracy": test_accuracy,
                }
            )
            summary.update(
                {
                    f"test_accuracy{suffix}": test_accuracy,
                    f"evaluator_hash{suffix}": evaluator_hash,
                }
            )
        (tmp / SPACES_FILE).write_text(json.dumps(spaces, indent=2) + "\n")
    write_json(args.metrics, summary)
    print(
        "train_evaluator: test accuracy "
        + ", ".join(
            f"{s['test_accuracy']:.4f} ({s['section']}: {s['arch']}, seed {s['seed']}, hash {s['evaluator_hash'][:12]}, "
            f"{trained[s['suffix']][2]:.0f} s)"
            for s in spaces
        )
        + f"; {time.perf_counter() - started:.0f} s in all"
    )


if __name__ == "__main__":
    run_stage(main)
