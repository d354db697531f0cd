"""Backbones shared by the four families: a conv (DCGAN-style) or MLP encoder and decoder.

Encoders map [N, 1, 28, 28] -> [N, out_dim]; decoders map [N, latent] -> logits [N, 1, 28, 28].
"""
from __future__ import annotations

from torch import nn


def conv_encoder(width: int, out_dim: int, norm: bool = False, slope: float = 0.0) -> nn.Sequential:
    act = (lambda: nn.LeakyReLU(slope)) if slope else nn.ReLU
    bn = (lambda c: nn.BatchNorm2d(c)) if norm else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(1, width, 4, 2, 1), act(),  # 28 -> 14 (no norm on the first layer, as in DCGAN)
        nn.Conv2d(width, 2 * width, 4, 2, 1), bn(2 * width), act(),  # 14 -> 7
        nn.Flatten(),
        nn.Linear(2 * width * 49, out_dim),
    )


def conv_decoder(width: int, latent_dim: int, norm: bool = False) -> nn.Sequential:
    bn1 = nn.BatchNorm1d(2 * width * 49) if norm else nn.Identity()
    bn2 = nn.BatchNorm2d(width) if norm else nn.Identity()
    return nn.Sequential(
        nn.Linear(latent_dim, 2 * width * 49), bn1, nn.ReLU(),
        nn.Unflatten(1, (2 * width, 7, 7)),
        nn.ConvTranspose2d(2 * width, width, 4, 2, 1), bn2, nn.ReLU(),  # 7 -> 14
        nn.ConvTranspose2d(width, 1, 4, 2, 1),  # 14 -> 28, logits
    )


def mlp_encoder(hidden: int, out_dim: int, slope: float = 0.0) -> nn.Sequential:
    act = nn.LeakyReLU(slope) if slope else nn.ReLU()
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), act, nn.Linear(hidden, out_dim))


def mlp_decoder(hidden: int, latent_dim: int, norm: bool = False) -> nn.Sequential:
    bn = nn.BatchNorm1d(hidden) if norm else nn.Identity()
    return nn.Sequential(
        nn.Linear(latent_dim, hidden), bn, nn.ReLU(), nn.Linear(hidden, 784), nn.Unflatten(1, (1, 28, 28))
    )


def encoder(p, out_dim: int, norm: bool = False, slope: float = 0.0) -> nn.Sequential:
    """The encoder (or discriminator body) named by `p.arch`."""
    if p.arch == "conv":
        return conv_encoder(p.width, out_dim, norm, slope)
    return mlp_encoder(p.hidden, out_dim, slope)


def decoder(p, norm: bool = False) -> nn.Sequential:
    """The decoder (or generator) named by `p.arch`."""
    if p.arch == "conv":
        return conv_decoder(p.width, p.latent_dim, norm)
    return mlp_decoder(p.hidden, p.latent_dim, norm)
