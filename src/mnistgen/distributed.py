"""Data-parallel training for the one harness: `torchrun --nproc_per_node N -m mnistgen.stages.train <model>`.

Every rank holds the whole training set and draws the same per-epoch permutation, so all
ranks see the same global batches, the ones a single process sees; rank r trains on the r-th
contiguous slice of each (`local_rows`). A step on N ranks equals the single process's step
on that global batch, to float rounding:

- gradients: each optimizer averages its gradients over the ranks just before it steps (one
  all-reduce of all its gradients, an optimizer step pre-hook), not DistributedDataParallel:
  DDP would wrap each family's networks (changing their state_dict keys), misses parameters
  no module's forward uses (the CVAE's class means), all-reduces the critic's gradients in the
  generator's step for nothing, and in its static_graph mode trains the WGAN-GP (critic called
  three times a step, penalty by double backward) silently wrong (measured once with a probe since removed;
  its default mode is right). The pre-hook is exact for every family with no model change.
- noise: every per-sample random draw inside a training step goes through `rows`, which
  draws the rows of the whole global batch from the (identically seeded) generator and keeps
  this rank's, so the ranks' noise is the single process's noise, split.
- batch norm: statistics over the global batch (torch's SyncBatchNorm on CUDA; on CPU, where
  it refuses to run, `GlobalBatchNorm`, which all-reduces its sums differentiably).

Without a process group (a plain `python -m mnistgen.stages.train`) every helper here is the identity.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import traceback

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .utils import StageError

_in_step = False  # True inside a training step: only there do draws cover the global batch


def launched() -> bool:
    """Started by torchrun (or with RANK/WORLD_SIZE set by hand) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: torch.device, timeout_s: float) -> torch.device:
    """Join the process group (gloo on CPU, NCCL on CUDA); returns this rank's device.

    The timeout bounds every collective: a rank that hangs fails the others after timeout_s
    instead of blocking them for ever (one that dies is noticed at once by torchrun, which
    stops the rest).
    """
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0, which alone logs, prints, writes outputs and checkpoints."""
    return rank() == 0


def local_rows(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (all of it with one process); the slices of
    ranks 0, 1, ... concatenated are the batch, in the order `rows` draws its noise."""
    n = len(batch)
    if n % world_size():
        raise StageError(
            f"batch_size {n} is not divisible by the {world_size()} processes: each needs the same share of the global batch"
        )
    share = n // world_size()
    return batch[rank() * share : (rank() + 1) * share]


@contextlib.contextmanager
def training_step():
    """Per-sample draws made inside cover the global batch (see `rows`)."""
    global _in_step
    _in_step = True
    try:
        yield
    finally:
        _in_step = False


def rows(n: int, draw) -> torch.Tensor:
    """`draw(m)` (m rows of random numbers) for this rank's n rows of the global batch.

    Inside a training step of a data-parallel run it draws world_size * n rows, the whole
    global batch's, and keeps this rank's slice, so all ranks advance their generators alike
    and together use exactly what one process would draw. Elsewhere it is draw(n).
    """
    if not _in_step or world_size() == 1:
        return draw(n)
    return draw(world_size() * n)[rank() * n : (rank() + 1) * n]


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of t over the ranks (t itself with one process)."""
    if world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / world_size()


def broadcast_state(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (they are equal already when all seed alike;
    this makes it so whatever built them)."""
    for t in model.state_dict().values():
        buffer = t.contiguous()  # channels_last conv weights are not
        dist.broadcast(buffer, 0)
        t.copy_(buffer)


def average_gradients(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Optimizer step pre-hook: replace each gradient by its mean over the ranks (one flat all-reduce)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world_size()
    for grad, mean in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(mean)


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its gradient (the sum of the upstream gradients): batch statistics that
    depend on every rank's rows pass each rank's share of their gradient back to it."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the global batch, for CPU ranks.

    Same parameters, buffers and state_dict keys as the BatchNorm1d/2d it replaces; in eval
    mode it is that layer (running statistics, no communication).
    """

    def _check_input_dim(self, input):
        pass

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dtype, x = x.dtype, x.float()  # statistics in fp32 under bf16 autocast, as torch's batch norm keeps them
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1] * world_size()
        mean = _SumOverRanks.apply(x.sum(dims)) / count
        centred = x - mean.view(shape)
        var = _SumOverRanks.apply(centred.square().sum(dims)) / count  # biased, as batch norm normalises
        if self.track_running_stats:
            self._track(mean.detach(), var.detach() * count / (count - 1))  # the unbiased variance, as BatchNorm tracks
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        out = out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out
        return out.to(dtype)

    @torch.no_grad()
    def _track(self, mean, var):
        assert self.num_batches_tracked is not None and self.running_mean is not None and self.running_var is not None
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(var, momentum)


def global_batch_norm(model: nn.Module, device: torch.device) -> None:
    """Replace the model's batch norms in place by ones over the global batch."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
                cls = nn.SyncBatchNorm if device.type == "cuda" else GlobalBatchNorm
                new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new.to(device))


def prepare_model(model: nn.Module) -> None:
    """Make one rank's model data-parallel (nothing with one process): global batch norm, rank 0's weights."""
    if world_size() > 1:
        global_batch_norm(model, next(model.parameters()).device)
        broadcast_state(model)


def prepare_optimizers(optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Each optimizer averages its gradients over the ranks before it steps (nothing with one process)."""
    if world_size() > 1:
        for optimizer in optimizers.values():
            optimizer.register_step_pre_hook(average_gradients)


@contextlib.contextmanager
def session(device: torch.device, timeout_s: float):
    """A stage's process group when launched by torchrun (else nothing); yields this rank's device.

    A collective that fails because another rank died or hung ends this rank with one line
    (run_stage prints StageError's message) instead of a traceback through gloo or NCCL.
    """
    if not launched():
        yield device
        return
    device = start(device, timeout_s)
    try:
        yield device
    except RuntimeError as err:  # gloo raises RuntimeError, NCCL DistBackendError (a RuntimeError too)
        if not from_collective(err):
            raise
        raise StageError(
            f"rank {rank()} of {world_size()}: lost the other processes of the run ({brief(err)}); "
            f"running the command again resumes from the last checkpoint"
        ) from None  # one line: run_stage prints the message, not gloo's traceback
    finally:
        with contextlib.suppress(RuntimeError):  # tearing down a group whose peers are gone may fail too: nothing to add
            stop()


# What gloo and NCCL say when a peer is gone. A collective inside a backward pass (the global batch norm's all-reduce)
# fails in autograd's engine, whose re-raised error keeps no frame of torch.distributed: its message tells it apart.
LOST_PEER = re.compile(r"gloo|nccl|connection (reset|closed|refused)|broken pipe|timed out|pair\.cc|socket", re.IGNORECASE)


def from_collective(err: BaseException) -> bool:
    """Raised by torch.distributed (a frame of it in the traceback, or gloo's or NCCL's words): a collective that failed
    because another rank died or hung, not a bug of ours."""
    seen: BaseException | None = err
    while seen is not None:
        frames = traceback.extract_tb(seen.__traceback__)
        if any(f"torch{os.sep}distributed{os.sep}" in frame.filename for frame in frames) or LOST_PEER.search(str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def brief(err: BaseException) -> str:
    """'[.../pair.cc:545] Read error [127.0.0.1]:27560: Connection reset by peer. This is typically...' ->
    'Read error [127.0.0.1]:27560: Connection reset by peer'."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0]
