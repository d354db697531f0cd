"""Variational autoencoder: Gaussian q(z|x), Bernoulli decoder, loss = reconstruction + beta * KL."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import PositiveFloat

from .. import distributed
from ..config import ModelParams
from . import nets
from .base import GenerativeModel, adam, bce_per_image, init_output_bias


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample, closed form (nats)."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(1)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """z = mu + eps * sigma: the sample stays differentiable in mu and logvar. `eps`: given noise (an evaluation draws
    it on a CPU generator), else drawn here."""
    if eps is None:
        eps = distributed.rows(len(mu), lambda m: torch.randn(m, *mu.shape[1:], dtype=mu.dtype, device=mu.device))
    return mu + eps.to(mu) * (0.5 * logvar).exp()


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, exp(logvar)) summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).square() / logvar.exp()).sum(-1)


class VAEParams(ModelParams):
    family: Literal["vae"]
    beta: PositiveFloat  # weight of the KL term (1 = the ELBO)
    dynamic_binarization: bool  # train on Bernoulli samples of the grey images


class VAE(GenerativeModel):
    family = "vae"
    Params = VAEParams
    params: VAEParams
    has_encoder = True

    def __init__(self, params):
        super().__init__(params)
        self.encoder = nets.encoder(params, 2 * params.latent_dim)  # mu and log-variance heads
        self.decoder = nets.decoder(params)

    def make_optimizers(self):
        return {"model": adam(self.parameters(), self.params.lr)}

    def init_from_data(self, images):
        init_output_bias(self.decoder, images)

    def posterior(self, x):
        mu, logvar = self.encoder(x).float().chunk(2, dim=1)
        return mu, logvar

    def encode(self, x):
        return self.posterior(x)[0]

    def decode(self, z):
        return torch.sigmoid(self.decoder(z).float())

    def prior_loc(self, y, mu: torch.Tensor) -> torch.Tensor:
        """The mean of the prior p(z) (the CVAE: p(z | y)) for each row of mu; N(0, I) here."""
        return torch.zeros_like(mu)

    def log_prior(self, z: torch.Tensor, y=None) -> torch.Tensor:
        """log p(z) (the CVAE given labels y: log p(z | y)), summed over the latent dimensions."""
        return log_normal(z, self.prior_loc(y, z), torch.zeros_like(z))

    def negative_elbo(self, x, beta: float = 1.0, y=None, eps=None):
        """Per-image reconstruction (BCE) and KL terms and their sum, in nats (given labels y for the CVAE); `eps`: the
        reparameterisation's noise, when given."""
        mu, logvar = self.posterior(x)
        logits = self.decoder(reparameterize(mu, logvar, eps))
        recon = bce_per_image(logits, x)
        kl = kl_divergence(mu - self.prior_loc(y, mu), logvar)  # KL(N(mu, s) || N(m, I)) = KL(N(mu - m, s) || N(0, I))
        return recon, kl, recon + beta * kl

    def train_step(self, x, optimizers, step, y=None):
        if self.params.dynamic_binarization:
            u = distributed.rows(len(x), lambda m: torch.rand(m, *x.shape[1:], dtype=x.dtype, device=x.device))
            x = (u < x).to(x.dtype)  # a Bernoulli sample with p = x
        recon, kl, loss = self.negative_elbo(x, self.params.beta, y)
        loss = loss.mean()
        optimizers["model"].zero_grad(set_to_none=True)
        loss.backward()
        optimizers["model"].step()
        return {"loss": loss.detach(), "recon": recon.mean().detach(), "kl": kl.mean().detach()}

    @torch.no_grad()
    def validation_losses(self, x, y=None):
        recon, kl, nelbo = self.negative_elbo(x, y=y)
        return {"loss": nelbo.mean(), "recon": recon.mean(), "kl": kl.mean()}

    @torch.no_grad()
    def iwae_nll(self, x: torch.Tensor, k: int, chunk: int = 100, y=None, generator=None) -> torch.Tensor:
        """Importance-weighted bound on -log p(x) per image (Burda et al. 2015), k samples.

        -log (1/k) sum_i p(x, z_i) / q(z_i | x), z_i ~ q(z | x); k = 1 is the ELBO.
        Samples are drawn in chunks so memory stays bounded for k = 5,000.
        """
        return self.iwae_nlls(x, k, chunk, [y], generator)[0]

    @torch.no_grad()
    def iwae_nlls(
        self, x: torch.Tensor, k: int, chunk: int = 100, priors=(None,), generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """The IWAE bound once per prior of `priors` (labels y: p(z | y); None: p(z), the CVAE's marginal), all
        from the same k draws and decoder passes, which are most of the cost: the bounds differ only in log p(z).
        The draws come from `generator` (on its device, then moved), else from the device's own generator."""
        mu, logvar = self.posterior(x)
        parts: list[list[torch.Tensor]] = [[] for _ in priors]
        where = mu.device if generator is None else generator.device
        for start in range(0, k, chunk):
            m = min(chunk, k - start)
            eps = torch.randn(m, *mu.shape, generator=generator, device=where).to(mu.device)
            z = mu + eps * (0.5 * logvar).exp()  # [m, N, d]
            logits = self.decoder(z.flatten(0, 1)).float()
            log_px_z = -bce_per_image(logits, x.repeat(m, 1, 1, 1)).view(m, -1)
            log_qz = log_normal(z, mu, logvar)
            for part, y in zip(parts, priors):
                part.append(log_px_z + self.log_prior(z, None if y is None else y.expand(m, -1)) - log_qz)
        return [-(torch.logsumexp(torch.cat(part), 0) - math.log(k)) for part in parts]  # each over its [k, N] weights
