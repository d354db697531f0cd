"""Class-conditional VAE, the prior-mean form: each digit y has its own prior N(mu_y, I).

The encoder's posterior q(z|x) is pulled towards its class's Gaussian (KL(q(z|x) || N(mu_y, I)),
one learned mean mu_y per digit) instead of one N(0, I), so the latent space falls into ten
clusters; the decoder sees only z, so sampling a 7 is z ~ N(mu_7, I), then decode. Its -ELBO
and IWAE bound given the label bound -log p(x | y); its IWAE bound with the label marginalised
(log_prior without y) bounds -log p(x), like the VAE's.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import PositiveFloat
from torch import nn

from .base import NUM_CLASSES
from .vae import VAE, VAEParams, log_normal


class CVAEParams(VAEParams):
    family: Literal["cvae"]  # type: ignore[assignment]  # a subclass narrows the union tag
    prior_mean_init: PositiveFloat  # the class means start as draws from N(0, s^2 I): how far apart the ten priors begin


class CVAE(VAE):
    family = "cvae"
    Params = CVAEParams  # type: ignore[assignment]  # its own params class
    params: CVAEParams
    conditional = True
    gaussian_latent = False  # the prior is ten Gaussians around the class means, not one N(0, I) at the origin

    def __init__(self, params):
        super().__init__(params)
        # One mean per digit, started apart so the ten classes need not break a symmetry; the further apart they
        # start, the less the ten Gaussians overlap after training (the decoder never sees y, so overlap costs fidelity).
        self.class_means = nn.Parameter(params.prior_mean_init * torch.randn(NUM_CLASSES, params.latent_dim))

    def prior_loc(self, y, mu):
        if y is None:
            raise ValueError("cvae: the prior N(mu_y, I) needs the labels y")
        return self.class_means[y.to(self.class_means.device)].to(mu.dtype)

    def log_prior(self, z, y=None):
        """log p(z | y) given labels; without them the label is marginalised: log sum_y p(y) N(z; mu_y, I),
        p(y) = 1/10. As the decoder sees only z, an IWAE bound with this prior bounds -log p(x), the VAE's quantity."""
        if y is not None:
            return super().log_prior(z, y)
        means = self.class_means.to(z.dtype)  # [10, d]
        per_class = log_normal(z.unsqueeze(-2), means, torch.zeros_like(means))  # [..., 10]
        return torch.logsumexp(per_class, -1) - math.log(NUM_CLASSES)

    def decode(self, z, labels=None):
        return super().decode(z)  # the decoder sees only z: the digit lives in where z sits

    def noise_to_latent(self, eps, labels):
        return self.class_means[labels] + eps  # z ~ N(mu_y, I)

    def class_latent_means(self):
        return self.class_means.detach()
