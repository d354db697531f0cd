"""WGAN-GP: a critic kept near 1-Lipschitz by a penalty on its gradient norm.

The penalty is taken at y = eps * real + (1 - eps) * fake, eps ~ U[0, 1] drawn per sample:
two-sided lambda * (||grad D(y)|| - 1)^2 (Gulrajani et al. 2017) or one-sided
lambda * max(0, ||grad D(y)|| - 1)^2; the gradient norm comes from autograd, or, cheaper,
from the difference quotient |D(y1) - D(y2)| / ||y1 - y2|| of two random points on the
same real-fake segment, whose critic passes run in fp32 even under bf16 autocast.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import PositiveFloat, PositiveInt

from .. import distributed
from . import nets
from .gan import GAN, GANParams, critic_sized


def per_sample_uniform(x: torch.Tensor) -> torch.Tensor:
    """One eps ~ U[0, 1] per sample, broadcast over its pixels."""
    return distributed.rows(len(x), lambda m: torch.rand(m, *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype))


def autograd_norm(critic, real, fake, eps=None) -> torch.Tensor:
    """||grad_y D(y)|| per sample at y on the real-fake segment (create_graph for the double backward)."""
    eps = per_sample_uniform(real) if eps is None else eps
    y = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(y).float().sum(), y, create_graph=True)
    return grad.flatten(1).norm(dim=1)


def difference_quotient(critic, real, fake, eps1=None, eps2=None) -> torch.Tensor:
    """|D(y1) - D(y2)| / ||y1 - y2|| per sample for two random points on each real-fake segment.

    By default the second point is the first moved half the segment along it, wrapping round:
    eps2 = (eps1 + 1/2) mod 1. Each point is still uniform on the segment, but the two are never
    close, so the quotient never divides a rounding-sized score difference by a tiny distance (two
    independent draws came within 1e-3 of each other in one sample of 500, and there a change in
    the last bit of a score, from another CPU or batch split, flipped the penalty's gradient).
    """
    eps1 = per_sample_uniform(real) if eps1 is None else eps1
    eps2 = torch.remainder(eps1 + 0.5, 1.0) if eps2 is None else eps2
    real, fake = real.float(), fake.float()
    y1 = eps1.float() * real + (1 - eps1.float()) * fake
    y2 = eps2.float() * real + (1 - eps2.float()) * fake
    # fp32 even under autocast: the quotient divides a small difference of two large scores by a small
    # distance, so bf16 rounding of the scores (8 bits of mantissa: 0.5 at a score of 100) would swamp it.
    with torch.autocast(device_type=real.device.type, enabled=False):
        scores = critic(torch.cat([y1, y2])).float().squeeze(1)
    d1, d2 = scores.chunk(2)
    return (d1 - d2).abs() / (y1 - y2).flatten(1).norm(dim=1).clamp_min(1e-12)


def with_label(critic, y: torch.Tensor):
    """A conditional critic as a function of the image alone, the labels fixed. The finite-difference quotient
    scores two batches of segment points at once, so the labels are tiled to the batch it is given."""
    return lambda images: critic(images, y.repeat(len(images) // len(y)))


def penalty(norm: torch.Tensor, weight: float, one_sided: bool) -> torch.Tensor:
    excess = norm - 1
    if one_sided:
        excess = excess.clamp_min(0)
    return weight * excess.square().mean()


class WGANParams(GANParams):
    family: Literal["wgan"]  # type: ignore[assignment]  # a subclass narrows the union tag
    n_critic: PositiveInt  # critic steps per generator step
    gp_weight: PositiveFloat  # lambda
    penalty: Literal["two_sided", "one_sided"]
    gradient: Literal["autograd", "finite_difference"]


class WGAN(GAN):
    family = "wgan"
    Params = WGANParams  # type: ignore[assignment]  # its own params class
    params: WGANParams
    twice_differentiated = ("critic",)  # the gradient penalty differentiates the critic's gradient (create_graph=True)

    @property
    def n_critic(self) -> int:  # type: ignore[override]  # the params' value, not a class constant
        return self.params.n_critic

    @staticmethod
    def make_critic(params):
        # No batch norm (the penalty is per sample), no output bias (the Wasserstein loss cancels it).
        return nets.encoder(critic_sized(params), 1, norm=False, slope=0.2, out_bias=False)

    def gradient_norm(self, real, fake, *labels):
        critic = with_label(self.critic, *labels) if labels else self.critic
        if self.params.gradient == "finite_difference":
            return difference_quotient(critic, real, fake)
        return autograd_norm(critic, real, fake)

    def critic_loss(self, real, fake, *labels):
        real_score, fake_score = self.score(real, *labels), self.score(fake, *labels)
        wasserstein = real_score.mean() - fake_score.mean()  # the critic's estimate of W(real, fake)
        with torch.enable_grad():
            norm = self.gradient_norm(real, fake, *labels)
        gp = penalty(norm, self.params.gp_weight, self.params.penalty == "one_sided")
        return -wasserstein + gp, {"wasserstein": wasserstein, "gp": gp, "grad_norm": norm.mean()}

    def generator_loss(self, fake, *labels):
        return -self.score(fake, *labels).mean()
