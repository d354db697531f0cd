"""One rank of tests/test_distributed.py's equivalence check: trains every case with the harness
(its slice of each global batch) and, on rank 0, saves each case's weights. Started twice (RANK 0 and 1) with
WORLD_SIZE=2 and MASTER_ADDR/MASTER_PORT set, as torchrun would.

Usage: python tests/ddp_worker.py OUT_FOLDER
"""

import sys
from pathlib import Path

import torch
from ddp_cases import CASES, data, params  # tests/ is sys.path[0] for a script started from it

from mnistgen import distributed, training
from mnistgen.models import build_model
from mnistgen.utils import seed_everything


def main(out: Path) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    with distributed.session(torch.device("cpu"), timeout_s=60):
        for name, (family, changes) in CASES.items():
            seed_everything(0, deterministic=True)  # every rank alike: same initial weights, same noise stream
            model = build_model(params(family, **changes))
            images, labels, val_images, val_labels = data()
            training.train(model, images, val_images, seed=0, progress=False, train_labels=labels, val_labels=val_labels)
            if distributed.is_main():
                torch.save(model.state_dict(), out / f"{name}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
