"""Backbones shared by the families: a conv (DCGAN-style) or MLP encoder and decoder.

Encoders map [N, 1, 28, 28] -> [N, out_dim]; decoders map [N, latent] -> logits [N, 1, 28, 28].
A layer that feeds a batch norm has no bias, as in DCGAN: the norm subtracts the batch mean, so
such a bias would get no gradient in exact arithmetic, and Adam would turn its rounding noise
into steps of size lr that differ from one CPU, or one process count, to the next.
"""

from __future__ import annotations

from torch import nn


def conv_encoder(width: int, out_dim: int, norm: bool = False, slope: float = 0.0, out_bias: bool = True) -> nn.Sequential:
    act = (lambda: nn.LeakyReLU(slope)) if slope else nn.ReLU
    bn = (lambda c: nn.BatchNorm2d(c)) if norm else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(1, width, 4, 2, 1),
        act(),  # 28 -> 14 (no norm on the first layer, as in DCGAN)
        nn.Conv2d(width, 2 * width, 4, 2, 1, bias=not norm),
        bn(2 * width),
        act(),  # 14 -> 7
        nn.Flatten(),
        nn.Linear(2 * width * 49, out_dim, bias=out_bias),
    )


def conv_decoder(width: int, latent_dim: int, norm: bool = False) -> nn.Sequential:
    bn1 = nn.BatchNorm1d(2 * width * 49) if norm else nn.Identity()
    bn2 = nn.BatchNorm2d(width) if norm else nn.Identity()
    return nn.Sequential(
        nn.Linear(latent_dim, 2 * width * 49, bias=not norm),
        bn1,
        nn.ReLU(),
        nn.Unflatten(1, (2 * width, 7, 7)),
        nn.ConvTranspose2d(2 * width, width, 4, 2, 1, bias=not norm),
        bn2,
        nn.ReLU(),  # 7 -> 14
        nn.ConvTranspose2d(width, 1, 4, 2, 1),  # 14 -> 28, logits
    )


def mlp_encoder(hidden: int, out_dim: int, slope: float = 0.0, out_bias: bool = True) -> nn.Sequential:
    act = nn.LeakyReLU(slope) if slope else nn.ReLU()
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), act, nn.Linear(hidden, out_dim, bias=out_bias))


def mlp_decoder(hidden: int, latent_dim: int, norm: bool = False) -> nn.Sequential:
    bn = nn.BatchNorm1d(hidden) if norm else nn.Identity()
    return nn.Sequential(
        nn.Linear(latent_dim, hidden, bias=not norm), bn, nn.ReLU(), nn.Linear(hidden, 784), nn.Unflatten(1, (1, 28, 28))
    )


def encoder(p, out_dim: int, norm: bool = False, slope: float = 0.0, out_bias: bool = True) -> nn.Sequential:
    """The encoder (or critic body) named by `p.arch`; `out_bias=False` for a Wasserstein critic, whose
    loss and penalty are blind to a constant added to every score (that bias would get no gradient)."""
    if p.arch == "conv":
        return conv_encoder(p.width, out_dim, norm, slope, out_bias)
    return mlp_encoder(p.hidden, out_dim, slope, out_bias)


def decoder(p, norm: bool = False) -> nn.Sequential:
    """The decoder (or generator) named by `p.arch`."""
    if p.arch == "conv":
        return conv_decoder(p.width, p.latent_dim, norm)
    return mlp_decoder(p.hidden, p.latent_dim, norm)
