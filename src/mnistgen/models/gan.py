"""GAN (DCGAN-style): a discriminator scores real against generated; non-saturating loss."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn
from torch.nn import functional as F

from ..config import ModelParams
from . import nets
from .base import GenerativeModel, adam


class GANParams(ModelParams):
    family: Literal["gan"]
    betas: tuple[float, float] = Field(strict=False)  # Adam's (beta1, beta2); YAML gives a list
    critic_width: PositiveInt  # channels of the critic's first conv layer (arch conv); `width` is the generator's
    critic_lr: PositiveFloat  # the critic's (discriminator's) learning rate; `lr` is the generator's (TTUR when they differ)


def critic_sized(params: GANParams) -> GANParams:
    """The params with `width` set to the critic's, for the backbone builders (nets.encoder) that read `width`."""
    return params.model_copy(update={"width": params.critic_width})


class GAN(GenerativeModel):
    family = "gan"
    Params = GANParams
    params: GANParams
    n_critic = 1  # critic steps per generator step

    def __init__(self, params):
        super().__init__(params)
        self.generator: nn.Module = nets.decoder(params, norm=True)
        self.critic = self.make_critic(params)

    @staticmethod
    def make_critic(params):
        return nets.encoder(critic_sized(params), 1, norm=True, slope=0.2)

    def decode(self, z):
        return torch.sigmoid(self.generator(z).float())

    def averaged(self):
        return self.generator

    def make_optimizers(self):
        p = self.params
        return {
            "critic": adam(self.critic.parameters(), p.critic_lr, p.betas),
            "generator": adam(self.generator.parameters(), p.lr, p.betas),
        }

    def score(self, x, *labels):
        """The critic's score per image (of the given digits, for a conditional critic)."""
        return self.critic(x, *labels).float().squeeze(1)

    def fakes(self, n: int, *labels):
        """n generated images (of the given digits, for a conditional generator)."""
        return self.decode(self.sample_latent(n), *labels)

    def critic_loss(self, real, fake, *labels):
        real_score, fake_score = self.score(real, *labels), self.score(fake, *labels)
        loss = F.binary_cross_entropy_with_logits(real_score, torch.ones_like(real_score)) + F.binary_cross_entropy_with_logits(
            fake_score, torch.zeros_like(fake_score)
        )
        return loss, {"d_real": torch.sigmoid(real_score).mean(), "d_fake": torch.sigmoid(fake_score).mean()}

    def generator_loss(self, fake, *labels):
        score = self.score(fake, *labels)
        return F.binary_cross_entropy_with_logits(score, torch.ones_like(score))  # non-saturating

    def train_step(self, x, optimizers, step, *labels):
        """One critic step, and a generator step every n_critic-th; `labels` are a conditional model's batch
        labels, and its fakes are made of the same digits."""
        with torch.no_grad():
            fake = self.fakes(len(x), *labels)
        d_loss, stats = self.critic_loss(x, fake, *labels)
        optimizers["critic"].zero_grad(set_to_none=True)
        d_loss.backward()
        optimizers["critic"].step()
        out = {"d_loss": d_loss.detach(), **{k: v.detach() for k, v in stats.items()}}
        if (step + 1) % self.n_critic == 0:
            g_loss = self.generator_loss(self.fakes(len(x), *labels), *labels)
            optimizers["generator"].zero_grad(set_to_none=True)
            g_loss.backward()
            optimizers["generator"].step()
            out["g_loss"] = g_loss.detach()
        return out

    @torch.no_grad()
    def validation_losses(self, x, *labels):
        d_loss, stats = self.critic_loss(x, self.fakes(len(x), *labels), *labels)
        g_loss = self.generator_loss(self.fakes(len(x), *labels), *labels)
        return {"d_loss": d_loss, "g_loss": g_loss, **stats}
