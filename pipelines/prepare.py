"""Stage prepare: fetch the four MNIST files (MNIST_MIRROR or the official mirrors), verify
their MD5, parse IDX, carve a seeded validation split, write data/prepared/ atomically."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mnistgen import data  # noqa: E402
from mnistgen.config import PrepareParams, load_section  # noqa: E402
from mnistgen.utils import atomic_dir, run_stage, sha256_file, write_json  # noqa: E402

OUT = Path("data/prepared")


def main() -> None:
    started = time.perf_counter()
    params = load_section(PrepareParams, "prepare")
    train = data.read_pair("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
    test = data.read_pair("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    splits = data.make_splits(train, test, params)
    with atomic_dir(OUT) as tmp:
        for name, split in splits.items():
            data.save_split(split, tmp / f"{name}.pt")
        write_json(tmp / "meta.json", {
            "source": data.sources()[0],
            "md5": data.MNIST_FILES,
            "sizes": {name: len(split.labels) for name, split in splits.items()},
            "sha256": {name: sha256_file(tmp / f"{name}.pt") for name in splits},
            "params": vars(params),
        })
    sizes = ", ".join(f"{name} {len(s.labels)}" for name, s in splits.items())
    print(f"prepare: {sizes} images written to {OUT}/ in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    run_stage(main)
