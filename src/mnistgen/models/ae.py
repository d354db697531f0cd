"""Autoencoder: one code per image; its prior for sampling is a Gaussian fitted to training codes."""

from __future__ import annotations

from typing import Literal

import torch

from ..config import ModelParams
from . import nets
from .base import GenerativeModel, adam, bce_per_image, init_output_bias


class AEParams(ModelParams):
    family: Literal["ae"]


class AE(GenerativeModel):
    family = "ae"
    Params = AEParams
    has_encoder = True
    gaussian_latent = False  # its codes follow no set prior; sampling uses a fitted Gaussian
    prior_mean: torch.Tensor  # buffers
    prior_scale_tril: torch.Tensor

    def __init__(self, params):
        super().__init__(params)
        self.encoder = nets.encoder(params, params.latent_dim)
        self.decoder = nets.decoder(params)
        # The naive way to sample from an AE: a Gaussian fitted to its training codes.
        self.register_buffer("prior_mean", torch.zeros(params.latent_dim))
        self.register_buffer("prior_scale_tril", torch.eye(params.latent_dim))

    def make_optimizers(self):
        return {"model": adam(self.parameters(), self.params.lr)}

    def init_from_data(self, images):
        init_output_bias(self.decoder, images)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return torch.sigmoid(self.decoder(z).float())

    def losses(self, x):
        logits = self.decoder(self.encoder(x))
        recon = bce_per_image(logits, x).mean()
        mse = (torch.sigmoid(logits.float()) - x).square().mean()
        return {"loss": recon, "mse": mse}

    def train_step(self, x, optimizers, step):
        out = self.losses(x)
        optimizers["model"].zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizers["model"].step()
        return {k: v.detach() for k, v in out.items()}

    @torch.no_grad()
    def validation_losses(self, x):
        return self.losses(x)

    @torch.no_grad()
    def fit_prior(self, images, batch_size: int = 2000):
        codes = torch.cat([self.encode(images[i : i + batch_size]).float() for i in range(0, len(images), batch_size)])
        cov = torch.cov(codes.T) + 1e-5 * torch.eye(codes.shape[1], device=codes.device)
        self.prior_mean.copy_(codes.mean(0))
        self.prior_scale_tril.copy_(torch.linalg.cholesky(cov))

    def sample_latent(self, n, generator=None):
        eps = super().sample_latent(n, generator)
        return self.prior_mean + eps @ self.prior_scale_tril.T
