#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md, in one go, on a bare GPU machine that has torch and
# torchvision but neither dvc nor mlflow (about 7 minutes on an H100). Run from the repo root:
#     MNIST=path/to/the/four/mnist/gz/files bash benchmarks/gpu_session.sh
# The box needs torch, torchvision, numpy, PyYAML, tqdm and pydantic too (mnistgen.config's params
# are pydantic models); not ruamel.yaml (bench_common reads the params-paper.yaml profile without it).
# mnistgen need not be installed: src/ goes on PYTHONPATH below.
# Logs go to $OUT (default: artifacts/gpu/). Each step has its own time limit, so one that hangs
# does not cost the rest.
set -uo pipefail
OUT=${OUT:-artifacts/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
step() {  # step NAME SECONDS COMMAND...: run it, keep its log, show it without progress-bar lines
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date -u +%T))"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -vE "it/s\]|s/it\]|^vae epoch"
    echo "=== $name: exit ${PIPESTATUS[0]}"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
[ -f data/prepared/train.pt ] || MNIST_MIRROR=${MNIST:?set MNIST to the folder of the four MNIST files} python -m mnistgen.stages.prepare --out data/prepared || exit 1
# 1. the training path per model: bf16 vs fp32 steps/s, paper params, and one real training.train epoch
step gpu_check 150 python benchmarks/gpu_check.py --profile params-paper.yaml --budget-seconds 120 --json "$OUT/gpu_check.json"
# 2. memory format on CUDA (channels_last is the CPU default; is it worth it here too?)
step variants 120 python benchmarks/benchmark_train.py --device cuda --profile params-paper.yaml \
    --variants eager channels_last --repeats 3 --steps 100 --skip-baseline
# 3. the VAE time to a test -ELBO of 105.6 nats: the DataLoader baseline once, then a sweep of ours
step time_to_elbo 300 python benchmarks/vae_time_to_elbo.py --device cuda --baseline-max-seconds 220 --max-seconds 30 \
    --sweep 256:1e-2:5 512:1e-2:6 1024:1e-2:10 1024:2e-2:10 2048:2e-2:16 1024:5e-3:0
