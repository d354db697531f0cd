"""Paired comparisons of two models from their validation evidence: the gate's measurements.

Both models were measured under one protocol, so row i of each one's sample features was drawn from the same noise
and both scored the same validation images. Each compared metric's difference (candidate minus champion) comes with
the standard deviation of a paired bootstrap: every round resamples the sample indices and the reference images once,
for both (FID_cls), or the images (IWAE bound), so its spread is that of the difference. The gate (mnistgen.gate)
turns that evaluation noise and the training noise of metrics/seeds into a decision.

Evidence is moved to the CPU before it is paired: a champion re-measured on a GPU meets a candidate read from disk.
"""

from __future__ import annotations

from typing import Any

import torch

from . import metrics
from .config import GateSettings
from .gate import Comparison
from .utils import StageError


def on_cpu(evidence: Any) -> Any:
    """The evidence (nested dicts and lists of tensors) with every tensor on the CPU."""
    if isinstance(evidence, torch.Tensor):
        return evidence.to("cpu")
    if isinstance(evidence, dict):
        return {k: on_cpu(v) for k, v in evidence.items()}
    if isinstance(evidence, list | tuple):
        return type(evidence)(on_cpu(v) for v in evidence)
    return evidence


def one_device(*tensors: torch.Tensor) -> None:
    """Refuse to pair tensors that live on different devices, naming them."""
    devices = {str(t.device) for t in tensors}
    if len(devices) > 1:
        raise StageError(f"paired comparison: evidence on {', '.join(sorted(devices))}; move it to one device first (on_cpu)")


def paired_comparisons(
    keys: list[str], candidate: dict, champion: dict, reference_feats: dict, rules: GateSettings
) -> list[Comparison]:
    """Candidate minus champion on each metric of `keys`, each with its paired bootstrap's standard deviation over
    `rules.bootstrap` rounds. `reference_feats[suffix]` are the validation images' features in each space."""
    candidate, champion, reference_feats = on_cpu(candidate), on_cpu(champion), on_cpu(reference_feats)
    out = []
    for key in keys:
        if key.startswith("fid_cls"):
            suffix = key.removeprefix("fid_cls")
            a, b, ref = candidate["sample_feats"][suffix], champion["sample_feats"][suffix], reference_feats[suffix]
            one_device(a, b, ref)
            if a.shape != b.shape:
                raise StageError(f"{key}: {len(a)} candidate samples against {len(b)} of the champion: not one protocol")
            point = metrics.fid(a, ref) - metrics.fid(b, ref)
            counts = metrics.bootstrap_counts(len(a), rules.bootstrap, rules.bootstrap_seed)
            ref_counts = metrics.bootstrap_counts(len(ref), rules.bootstrap, rules.bootstrap_seed + 1)
            replicates = metrics.paired_fid_differences(a, b, ref, counts, ref_counts)
        elif key.startswith("iwae_nll"):
            a, b = candidate[key], champion[key]
            one_device(a, b)
            if a.shape != b.shape:
                raise StageError(f"{key}: {len(a)} candidate images against {len(b)} of the champion: not one protocol")
            point = float((a.double() - b.double()).mean())
            replicates = metrics.paired_mean_differences(
                a, b, metrics.bootstrap_counts(len(a), rules.bootstrap, rules.bootstrap_seed)
            )
        else:
            raise StageError(f"{key}: a paired comparison is defined for fid_cls and iwae_nll (the gate's primary metrics)")
        out.append(Comparison(key, point, float(replicates.std())))
    return out
