"""The VAE families' likelihood figures: the negative ELBO and the IWAE bound, in nats per image.

All three figures (-ELBO on grey images, -ELBO and IWAE bound on once-binarised images) are measured on the same
images of the split: all of them, or `iwae_images` drawn with evaluate.seed. `iwae_nll` bounds -log p(x) for every
family, so the VAE's and the CVAE's stand side by side: the CVAE's marginalises the label, log sum_y p(y) p(x | y),
through its prior (a mixture of the ten class Gaussians, as its decoder sees only z). Its bounds given each image's
label, `*_given_label`, are a row of the report: measured on the test split only, and nothing chooses by them.
Every draw (the binarisation, the importance samples, the -ELBO's noise) comes from a CPU generator.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .config import EvaluateParams
from .utils import progress_bar

if TYPE_CHECKING:
    from .models.vae import VAE

# 1,000 decoder passes per call, so that their activations stay in cache: on a 2-core Xeon, 25.6 ms per image at
# k = 1,000 (channels_last), against 28.9 ms at 2,000 passes per call and 33.7 ms at 4,000
IMAGES_PER_CALL = 20
PASSES_PER_CALL = 1_000


def binarize(x: torch.Tensor, seed: int) -> torch.Tensor:
    """One fixed Bernoulli draw of grey images (evaluate.binarize_seed), the same on every run and device."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(x.shape, generator=gen).to(x.device) < x).float()


def likelihood_subset(n: int, images: int, seed: int) -> torch.Tensor:
    """Indices of the images the -ELBO and the IWAE bound both use: all (images = 0 or >= n), else a seeded random subset."""
    if images == 0 or images >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:images].sort().values


def stderr(values: torch.Tensor) -> float:
    return (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else 0.0


@torch.no_grad()
def bounds(
    vae: VAE,
    x: torch.Tensor,
    y: torch.Tensor,
    p: EvaluateParams,
    importance: torch.Generator,
    noise: torch.Generator,
    given_label: bool,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The metrics, and the per-image bounds (the paired comparison's unit), of `vae` on images x (labels y).
    `importance` draws the IWAE bound's samples, `noise` the -ELBO's; `given_label` adds the bounds given y."""
    binarised_all = binarize(x, p.binarize_seed)  # every image once, then pick: an image's draw does not depend on the subset
    idx = likelihood_subset(len(x), p.iwae_images, p.seed + 3).to(x.device)
    grey, binarised = x[idx], binarised_all[idx]
    n = len(idx)
    chunk = max(1, min(p.iwae_k, PASSES_PER_CALL // IMAGES_PER_CALL))
    priors: dict[str, torch.Tensor | None] = {"": None}  # suffix -> labels given (None: the marginal bound)
    if given_label:
        priors["_given_label"] = y[idx]

    def given(labels: torch.Tensor | None, i: int, count: int) -> torch.Tensor | None:
        return None if labels is None else labels[i : i + count]

    per_call = [  # the bounds share their draws and decoder passes: they differ only in log p(z)
        vae.iwae_nlls(
            binarised[i : i + IMAGES_PER_CALL],
            p.iwae_k,
            chunk,
            [given(labels, i, IMAGES_PER_CALL) for labels in priors.values()],
            importance,
        )
        for i in progress_bar(range(0, n, IMAGES_PER_CALL), f"IWAE k={p.iwae_k}")
    ]
    eps = torch.randn(n, vae.latent_dim, generator=noise)  # the -ELBO's one draw per image, all at once
    metrics: dict[str, float] = {}
    evidence: dict[str, torch.Tensor] = {}
    for (suffix, labels), nll in zip(priors.items(), map(torch.cat, zip(*per_call))):
        metrics.update({f"iwae_nll{suffix}": nll.mean().item(), f"iwae_nll{suffix}_stderr": stderr(nll)})
        evidence[f"iwae_nll{suffix}"] = nll
        if labels is None and vae.conditional:
            continue  # the CVAE's ELBO needs a label (its marginal prior has no closed-form KL)
        for name, images in (("grey", grey), ("binarized", binarised)):
            nelbo = torch.cat(
                [
                    vae.negative_elbo(
                        images[i : i + p.batch_size], y=given(labels, i, p.batch_size), eps=eps[i : i + p.batch_size]
                    )[2]
                    for i in range(0, n, p.batch_size)
                ]
            )
            metrics.update({f"nelbo_{name}{suffix}": nelbo.mean().item(), f"nelbo_{name}{suffix}_stderr": stderr(nelbo)})
    metrics.update(
        {
            "iwae_images": float(n),
            "likelihood_images": float(n),
            "likelihood_all_images": float(n == len(x)),
            "iwae_k": float(p.iwae_k),
        }
    )
    return metrics, evidence
