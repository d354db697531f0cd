"""Model families by name (one file each) and the evaluator classifier."""
from __future__ import annotations

from ..config import ModelParams
from .ae import AE
from .base import GenerativeModel
from .gan import GAN
from .vae import VAE
from .wgan import WGAN

FAMILIES: dict[str, type[GenerativeModel]] = {"ae": AE, "vae": VAE, "gan": GAN, "wgan": WGAN}


def build_model(params: ModelParams) -> GenerativeModel:
    return FAMILIES[params.family](params)
