"""Stage prepare: fetch the four MNIST files (MNIST_MIRROR or the official mirrors), verify
their MD5, parse IDX, carve a seeded validation split, write the prepared splits atomically.

Usage: python -m mnistgen.stages.prepare --out data/prepared   (paths come from dvc.yaml)
"""

import argparse
import time
from pathlib import Path

from mnistgen import data, mnist_files
from mnistgen.config import PrepareParams, load_section
from mnistgen.utils import atomic_dir, run_stage, sha256_file, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    params = load_section(PrepareParams, "prepare")
    train = mnist_files.read_pair("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
    test = mnist_files.read_pair("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    splits = data.make_splits(train, test, params)
    with atomic_dir(args.out) as tmp:
        for name, split in splits.items():
            data.save_split(split, tmp / f"{name}.pt")
        write_json(
            tmp / "meta.json",
            {
                "md5": mnist_files.MNIST_FILES,
                "sizes": {name: len(split.labels) for name, split in splits.items()},
                "sha256": {name: sha256_file(tmp / f"{name}.pt") for name in splits},
                "params": params.model_dump(),
            },
        )
    sizes = ", ".join(f"{name} {len(s.labels)}" for name, s in splits.items())
    print(
        f"prepare: {sizes} images written to {args.out}/ from {mnist_files.sources()[0]} in {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    run_stage(main)
