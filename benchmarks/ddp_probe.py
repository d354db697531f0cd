"""Does DistributedDataParallel train a WGAN-GP right? The evidence for mnistgen.distributed's choice.

Usage: python benchmarks/ddp_probe.py     (2 gloo processes on this CPU, a few seconds)

Two ranks each take half of every global batch and run a few WGAN-GP steps (per step: the
critic's loss calls the critic three times, the penalty by a double backward; every n_critic-th
step the generator's loss backpropagates through the critic), with critic and generator wrapped
in DDP in each of its modes, and with plain modules whose gradients mnistgen.distributed's
optimizer pre-hook averages. Each run's weights are compared with one process's trained on the
whole batches with the same noise (drawn through distributed.rows, as in the harness); the
generator's batch norm is distributed.GlobalBatchNorm in every two-rank variant.
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from mnistgen import distributed
from mnistgen.config import model_params
from mnistgen.models import build_model

WORLD, BATCH, STEPS = 2, 16, 8
MODES = {"DDP": {}, "DDP static_graph": {"static_graph": True}, "DDP find_unused_parameters": {"find_unused_parameters": True}}


def wgan(gradient: str = "autograd"):
    torch.manual_seed(0)
    return build_model(
        model_params(
            {
                "family": "wgan",
                "arch": "conv",
                "width": 4,
                "hidden": 16,
                "latent_dim": 4,
                "epochs": 1,
                "batch_size": BATCH,
                "lr": 1e-3,
                "critic_lr": 1e-3,
                "critic_width": 4,
                "lr_warmup": 0.0,
                "lr_decay": False,
                "betas": [0.5, 0.9],
                "n_critic": 2,
                "gp_weight": 10.0,
                "penalty": "two_sided",
                "gradient": gradient,
            },
            "models.wgan",
        )
    )


# Zero gradient in exact arithmetic, so rounding noise that Adam scales up to about lr a step: the biases just
# before the generator's batch norms (and the running means that track them), the critic's output bias (the
# Wasserstein loss cancels it). Any two runs that round differently disagree there; nothing computed depends on them.
NULL_GRADIENT = {"generator.0.bias", "generator.1.running_mean", "generator.4.bias", "generator.5.running_mean", "critic.6.bias"}


def weights(model) -> torch.Tensor:
    return torch.cat([v.flatten() for k, v in model.state_dict().items() if v.is_floating_point() and k not in NULL_GRADIENT])


def train(model, real: torch.Tensor, ddp: dict | None = None, hooks: bool = False) -> torch.Tensor:
    """STEPS steps on the batches real[0], real[1], ...; the weights after."""
    if distributed.world_size() > 1:  # the generator's batch norm over the global batch, in every variant
        distributed.global_batch_norm(model, torch.device("cpu"))
    plain = model.critic, model.generator
    if ddp is not None:
        model.critic, model.generator = DDP(model.critic, **ddp), DDP(model.generator, **ddp)
    optimizers = model.make_optimizers()
    if hooks:
        distributed.prepare_optimizers(optimizers)
    torch.manual_seed(1)  # the noise: one global stream, split by distributed.rows
    for step in range(STEPS):
        with distributed.training_step():
            model.train_step(real[step], optimizers, step)
    model.critic, model.generator = plain
    return weights(model)


def one_process(real: torch.Tensor, gradient: str) -> torch.Tensor:
    """The reference: with the group's world size hidden, distributed.rows draws one batch's rows."""
    saved = distributed.world_size
    distributed.world_size = lambda: 1
    try:
        return train(wgan(gradient), real)
    finally:
        distributed.world_size = saved


def rank_main(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.manual_seed(2)
    real = torch.rand(STEPS, BATCH, 1, 28, 28)
    mine = real[:, rank * BATCH // WORLD : (rank + 1) * BATCH // WORLD]
    lines = []
    for gradient in ("autograd", "finite_difference"):
        reference = one_process(real, gradient)
        moved = (reference - weights(wgan(gradient))).abs().max().item()
        lines.append(f"penalty gradient {gradient} (weights moved up to {moved:.3g} in {STEPS} steps):")
        runs = {f"{name}": {"ddp": options} for name, options in MODES.items()}
        runs["plain modules, gradients all-reduced by an optimizer pre-hook"] = {"hooks": True}
        for name, how in runs.items():
            try:
                got = train(wgan(gradient), mine, **how)
                lines.append(f"  {name}: max |weight - one process's| = {(got - reference).abs().max().item():.3g}")
            except Exception as err:  # noqa: BLE001 - the point is to see what DDP does
                lines.append(f"  {name}: {type(err).__name__}: {str(err).strip().splitlines()[0][:200]}")
    if rank == 0:
        print(f"torch {torch.__version__}, gloo, {WORLD} ranks, global batch {BATCH}, WGAN-GP with n_critic 2")
        print("\n".join(lines))
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    mp.spawn(rank_main, args=(free,), nprocs=WORLD)
