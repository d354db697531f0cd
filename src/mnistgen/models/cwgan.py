"""Conditional WGAN-GP: the generator takes the digit, the critic scores (image, digit) pairs.

Generator: G(z, y) = decoder([z, embed(y)]), the label's embedding concatenated to the noise.
Critic: the projection discriminator of Miyato & Koyama (2018),
D(x, y) = psi(phi(x)) + <embed(y), phi(x)>. Real and fake images of a batch carry the same
labels, so every point on a real-fake segment has one label too: the gradient penalty is the
WGAN's own (models/wgan.py: two-/one-sided, autograd or finite difference), taken with respect
to the image only, on the critic as a function of the image with the label held fixed.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import PositiveInt
from torch import nn

from . import nets
from .base import NUM_CLASSES, balanced_labels
from .gan import critic_sized
from .wgan import WGAN, WGANParams


class CWGANParams(WGANParams):
    family: Literal["cwgan"]  # type: ignore[assignment]  # a subclass narrows the union tag
    embed_dim: PositiveInt  # size of the label embedding concatenated to the generator's noise
    projection_dim: PositiveInt  # size of the critic's features phi(x), and of its label projection


class LabelledGenerator(nn.Module):
    def __init__(self, params):
        super().__init__()
        self.embed = nn.Embedding(NUM_CLASSES, params.embed_dim)
        # The backbone named by params.arch, with the embedding's width added to its input.
        self.net = nets.decoder(params.model_copy(update={"latent_dim": params.latent_dim + params.embed_dim}), norm=True)

    def forward(self, z, y):
        return self.net(torch.cat([z, self.embed(y).to(z.dtype)], dim=1))


class ProjectionCritic(nn.Module):
    """D(x, y) = psi(phi(x)) + <embed(y), phi(x)>, shape [N, 1]; no batch norm (the penalty is per sample)."""

    def __init__(self, params):
        super().__init__()
        self.phi = nn.Sequential(
            nets.encoder(critic_sized(params), params.projection_dim, norm=False, slope=0.2), nn.LeakyReLU(0.2)
        )
        self.psi = nn.Linear(params.projection_dim, 1, bias=False)  # the Wasserstein loss cancels a constant
        self.embed = nn.Embedding(NUM_CLASSES, params.projection_dim)

    def forward(self, x, y):
        h = self.phi(x)
        return self.psi(h) + (self.embed(y).to(h.dtype) * h).sum(1, keepdim=True)


class CWGAN(WGAN):
    """The WGAN-GP's training step and losses, unchanged: the batch labels they pass on reach this
    generator (fakes of the real batch's digits) and the projection critic (scores and penalty)."""

    family = "cwgan"
    Params = CWGANParams  # type: ignore[assignment]  # its own params class
    params: CWGANParams
    conditional = True

    def __init__(self, params):
        super().__init__(params)
        self.generator = LabelledGenerator(params)

    @staticmethod
    def make_critic(params):
        return ProjectionCritic(params)

    def decode(self, z, labels=None):
        labels = balanced_labels(len(z), z.device) if labels is None else labels
        return torch.sigmoid(self.generator(z, labels).float())
