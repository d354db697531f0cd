"""What the shared training loop and evaluation expect of every model family."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelParams

Losses = dict[str, torch.Tensor]  # detached scalar tensors, read once per epoch (no per-step sync)


class GenerativeModel(nn.Module):
    """A model the harness can train, checkpoint, sample and decode.

    Subclasses set `family` and implement make_optimizers, train_step, validation_losses,
    decode and, where they have an encoder, encode.
    """

    family: str = ""
    has_encoder: bool = False

    def __init__(self, params: ModelParams):
        super().__init__()
        self.params = params
        self.latent_dim = params.latent_dim

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def train_step(self, x: torch.Tensor, optimizers: dict, step: int) -> Losses:
        """One optimisation step on batch x (images in [0, 1]); returns detached losses."""
        raise NotImplementedError

    @torch.no_grad()
    def validation_losses(self, x: torch.Tensor) -> Losses:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent vectors -> images in [0, 1], shape [N, 1, 28, 28]."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> latent codes (the mean for the VAE). AE and VAE only."""
        raise NotImplementedError(f"{self.family} has no encoder")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw n latent vectors from the model's prior (N(0, I) unless a family says otherwise).

        A `generator` must live on the model's device.
        """
        return torch.randn(n, self.latent_dim, generator=generator, device=self.device)

    def fit_prior(self, images: torch.Tensor) -> None:
        """Called once after training with the whole training set; the AE fits its Gaussian here."""

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.sample_latent(n, generator))


def bce_per_image(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bernoulli negative log-likelihood of each image, summed over pixels (nats)."""
    loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return loss.flatten(1).sum(1)


def adam(params, lr: float, betas=(0.9, 0.999)) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas))
