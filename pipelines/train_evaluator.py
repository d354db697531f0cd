"""Stage train_evaluator: the MNIST classifier whose features every sample-quality metric uses.

Writes models/evaluator/ (weights, reference features of test and a training subset) and
metrics/evaluator.json (test accuracy, checkpoint hash, the real-data row of the report).
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from mnistgen import data, evaluation  # noqa: E402
from mnistgen.config import EvaluateParams, EvaluatorParams, load_section  # noqa: E402
from mnistgen.evaluator import accuracy, train_classifier  # noqa: E402
from mnistgen.utils import StageError, atomic_dir, pick_device, run_stage, sha256_file, write_json  # noqa: E402

PREPARED = Path("data/prepared")
OUT = Path("models/evaluator")


def main() -> None:
    started = time.perf_counter()
    params = load_section(EvaluatorParams, "evaluator")
    eval_params = load_section(EvaluateParams, "evaluate")
    device = pick_device("auto")
    train, test = data.load_split(PREPARED, "train"), data.load_split(PREPARED, "test")
    train_x, train_y = data.to_float(train.images, device), train.labels.to(device)
    test_x, test_y = data.to_float(test.images, device), test.labels.to(device)

    model = train_classifier(train_x, train_y, params)
    test_accuracy = accuracy(model, test_x, test_y)
    if test_accuracy < params.min_test_accuracy:
        raise StageError(f"evaluator: test accuracy {test_accuracy:.4f} is below evaluator.min_test_accuracy {params.min_test_accuracy}")

    with atomic_dir(OUT) as tmp:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp / "classifier.pt")
        evaluator_hash = sha256_file(tmp / "classifier.pt")
        # Reference features, extracted once and reused by every evaluate@model stage.
        n_real = min(eval_params.num_real, len(train_x))
        subset = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(eval_params.seed))[:n_real]
        test_feats, test_probs = model.features_and_probs(test_x[: eval_params.num_real])
        train_feats, train_probs = model.features_and_probs(train_x[subset.to(device)])
        ref = evaluation.Reference(test_feats.cpu(), test_probs.cpu(), train_feats.cpu(), train_probs.cpu(), evaluator_hash)
        torch.save(ref.to_dict(), tmp / "reference.pt")
        real = evaluation.real_data_row(ref, eval_params)
    write_json("metrics/evaluator.json", {"test_accuracy": test_accuracy, "evaluator_hash": evaluator_hash, "real_data": real})
    print(f"train_evaluator: test accuracy {test_accuracy:.4f}, real-data FID_cls floor {real['fid_cls']:.3f}, "
          f"IS_cls {real['is_cls']:.2f}, hash {evaluator_hash[:12]}, {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    run_stage(main)
