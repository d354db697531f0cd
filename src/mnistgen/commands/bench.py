"""`mnistgen bench NAME [ARGS ...]`: a benchmark script of the source checkout's benchmarks/ folder.

The scripts are not part of the installed package: this command needs the repository an editable install
(`pip install -e .`) points at, and says so plainly otherwise.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]  # the checkout of an editable install
BENCHMARKS = {
    "train": ("benchmark_train.py", "the harness against the per-sample baseline, images per second"),
    "ddp": ("ddp_throughput.py", "one process against N, images per second"),
    "clock": ("quality_at_fixed_clock.py", "quality at a fixed CPU budget, both feature spaces"),
    "elbo": ("vae_time_to_elbo.py", "the VAE's time to a validation -ELBO against the PyTorch example's"),
    "gpu": ("gpu_check.py", "step times and bf16 against fp32 on a GPU"),
    "gate": ("gate_error_rate.py", "how often the promotion gate is wrong, and its power, from each model's seeds"),
}


def usage() -> str:
    return "usage: mnistgen bench NAME [ARGS ...]\n" + "\n".join(f"  {name:6s} {help}" for name, (_, help) in BENCHMARKS.items())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        print(usage(), file=sys.stderr)
        return 2
    script = REPO / "benchmarks" / BENCHMARKS[argv[0]][0]
    if not script.exists():
        print(
            f"error: mnistgen bench runs the scripts of a source checkout ({script} not found); clone the repository "
            "and install it with `pip install -e .`",
            file=sys.stderr,
        )
        return 2
    return subprocess.call([sys.executable, str(script), *argv[1:]])  # noqa: S603
