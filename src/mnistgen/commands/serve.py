"""`mnistgen serve MODEL [--alias champion]`: serve mnist-<MODEL>@<alias> over HTTP with `mlflow models serve`."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mnistgen serve", description=__doc__)
    parser.add_argument("model", help="ae, vae, gan, wgan, cvae or cwgan")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args(argv)
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    model = f"models:/mnist-{args.model}@{args.alias}"
    command = [mlflow, "models", "serve", "-m", model, "--env-manager", "local", "--host", args.host, "--port", str(args.port)]
    os.execv(command[0], command)  # noqa: S606 - the server replaces this process, so signals reach it directly
    return 0  # not reached
