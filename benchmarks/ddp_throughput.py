"""Training throughput of the data-parallel harness: N gloo processes against one, on the machine it runs on.

Usage (from the repo root):
    python benchmarks/ddp_throughput.py                      # vae and gan of params.yaml, 2 processes
    python benchmarks/ddp_throughput.py --models wgan --steps 40 --repeats 3 --processes 2 --threads 2

Each round times --steps training steps (after --warmup untimed ones) of the model's own params
(batch size = the global batch) on synthetic images, once in one process with --threads torch
threads and once in --processes gloo processes with --threads / --processes threads each, so both
use the same cores; the rounds alternate, and the median and best of the images per second are
printed. The step is the harness's (training.step with distributed.prepare_*: averaged gradients,
global batch norm, global noise draws), so the figure includes every all-reduce.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_common import Harness

from mnistgen import distributed
from mnistgen.models import build_model, load_model_params
from mnistgen.utils import memory_format, seed_everything


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, name: str, steps: int, warmup: int, threads: int, port: int, results) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    seed_everything(0)
    params = load_model_params(name)
    images = torch.rand(4096, 1, 28, 28)
    model = build_model(params)
    model.init_from_data(images)
    model.to(memory_format=memory_format(images.device))
    distributed.prepare_model(model)
    optimizers = model.make_optimizers()
    distributed.prepare_optimizers(optimizers)
    model.train()
    runner = Harness(model, optimizers, images, seed=0)  # training's own step loop: this rank's slice of each batch
    runner.run(warmup)
    if world > 1:
        dist.barrier()
    started = time.perf_counter()
    runner.run(steps)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        results.put(steps * params.batch_size / (time.perf_counter() - started))


def images_per_second(name: str, world: int, args) -> float:
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(
        worker,
        args=(world, name, args.steps, args.warmup, max(1, args.threads // world), free_port(), results),
        nprocs=world,
        start_method="spawn",
    )
    return results.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vae", "gan"], help="keys of params.yaml's models section")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all: each of N processes gets threads / N")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, CPU, gloo; {args.threads} threads in all; images/s (global batch x steps / s), "
        f"median (best) of {args.repeats} alternating rounds"
    )
    for name in args.models:
        single, parallel = [], []
        for _ in range(args.repeats):
            single.append(images_per_second(name, 1, args))
            parallel.append(images_per_second(name, args.processes, args))
        one, many = statistics.median(single), statistics.median(parallel)
        print(
            f"{name}: 1 process {one:.0f} ({max(single):.0f}), {args.processes} processes {many:.0f} "
            f"({max(parallel):.0f}): x{many / one:.2f}"
        )


if __name__ == "__main__":
    main()
