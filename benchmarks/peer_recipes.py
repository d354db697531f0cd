"""The peers' recipes, as the quality benchmark's baselines: what a widely used implementation reaches in
the same CPU seconds, trained on the same data by the same harness and scored by the same evaluation.

- vae:  the PyTorch examples VAE (pytorch/examples, vae/main.py): 784-400-20 MLP, ReLU, the ELBO on grey
        pixels, Adam 1e-3, batch 128, a constant learning rate, PyTorch's default initialisation.
- gan:  PyTorch-GAN's gan.py (eriklindernoren/PyTorch-GAN, implementations/gan): MLP generator
        100-128-256-512-1024-784 (batch norm with eps 0.8, as written there, LeakyReLU 0.2, tanh), MLP
        discriminator 784-512-256-1, the non-saturating loss, Adam 2e-4 with betas (0.5, 0.999), batch 64.
- wgan: PyTorch-GAN's wgan_gp.py: the same generator, critic 784-512-256-1 (no sigmoid), gradient penalty
        lambda 10 on random real-fake interpolates, 5 critic steps per generator step, Adam 2e-4, betas
        (0.5, 0.999), batch 64.

What is the peers' and what is ours: the networks, losses, optimisers and hyper-parameters are theirs; the
data path (device-resident batches, not their per-sample DataLoader) and the step loop are the harness's,
so a baseline is never slowed by a data path we already beat elsewhere (benchmark_train.py). Their
discriminator ends in a sigmoid under BCELoss; here the same function is computed as BCE with logits.
PyTorch-GAN trains the GANs on images scaled to [-1, 1]; so do these (`TanhImages`), and they hand
the evaluation [0, 1] images as every model does.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from mnistgen import config, models
from mnistgen.models.base import GenerativeModel
from mnistgen.models.gan import GAN, GANParams
from mnistgen.models.vae import VAE
from mnistgen.models.wgan import WGAN, WGANParams

# Where a baseline names a size the networks below fix, ModelParams still wants a value: arch mlp, and the
# widths are those of the peers' nets (documentation only: the nets ignore them).
_GAN_COMMON = {
    "arch": "mlp",
    "width": 1024,
    "critic_width": 512,
    "hidden": 1024,
    "latent_dim": 100,
    "epochs": 1,  # the benchmark sets the epochs that fill the clock
    "batch_size": 64,
    "lr": 2e-4,
    "critic_lr": 2e-4,
    "lr_warmup": 0.0,
    "lr_decay": False,
    "ema_decay": 0.0,
    "precision": "fp32",  # the tutorials' own
    "betas": [0.5, 0.999],
}
RECIPES: dict[str, tuple[str, dict]] = {  # a project family -> (the baseline's name, its models.<name> section)
    "vae": (
        "PyTorch examples VAE",
        {
            "family": "vae",
            "arch": "mlp",
            "width": 16,  # unused by arch mlp
            "hidden": 400,
            "latent_dim": 20,
            "epochs": 1,
            "batch_size": 128,
            "lr": 1e-3,
            "lr_warmup": 0.0,
            "lr_decay": False,
            "ema_decay": 0.0,
            "precision": "fp32",  # the tutorial's own
            "beta": 1.0,
            "dynamic_binarization": False,
        },
    ),
    "gan": ("PyTorch-GAN gan", {"family": "pytorch_gan", **_GAN_COMMON}),
    "wgan": (
        "PyTorch-GAN wgan_gp",
        {
            "family": "pytorch_gan_wgan_gp",
            **_GAN_COMMON,
            "n_critic": 5,
            "gp_weight": 10.0,
            "penalty": "two_sided",
            "gradient": "autograd",
        },
    ),
}


def generator(latent_dim: int) -> nn.Sequential:
    """PyTorch-GAN's Generator: Linear blocks to 128, 256, 512, 1024 (batch norm from the second), tanh."""

    def block(n_in: int, n_out: int, normalize: bool = True) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Linear(n_in, n_out)]
        if normalize:
            layers.append(nn.BatchNorm1d(n_out, 0.8))  # 0.8 is eps, as in their code (meant as momentum)
        layers.append(nn.LeakyReLU(0.2))
        return layers

    return nn.Sequential(
        *block(latent_dim, 128, normalize=False),
        *block(128, 256),
        *block(256, 512),
        *block(512, 1024),
        nn.Linear(1024, 784),
        nn.Tanh(),
        nn.Unflatten(1, (1, 28, 28)),
    )


def critic() -> nn.Sequential:
    """PyTorch-GAN's Discriminator, up to its score (their GAN's sigmoid is inside our BCE with logits)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.LeakyReLU(0.2), nn.Linear(512, 256), nn.LeakyReLU(0.2), nn.Linear(256, 1)
    )


class TanhImages:
    """Train on images in [-1, 1] against a tanh generator, as PyTorch-GAN does; decode to [0, 1] for the
    evaluation. The gradient penalty's interpolates are then in their space too."""

    generator: nn.Module

    def decode(self, z):
        return (self.generator(z).float() + 1) / 2

    def fakes(self, n: int, *labels):
        return self.generator(self.sample_latent(n))  # type: ignore[attr-defined]

    def train_step(self, x, optimizers, step, *labels):
        return super().train_step(x * 2 - 1, optimizers, step, *labels)  # type: ignore[misc]

    def validation_losses(self, x, *labels):
        return super().validation_losses(x * 2 - 1, *labels)  # type: ignore[misc]


class PyTorchGANParams(GANParams):
    family: Literal["pytorch_gan"]  # type: ignore[assignment]


class PyTorchGAN(TanhImages, GAN):
    family = "pytorch_gan"
    Params = PyTorchGANParams  # type: ignore[assignment]

    def __init__(self, params):
        GenerativeModel.__init__(self, params)  # not GAN's: its nets are the project's
        self.generator, self.critic = generator(params.latent_dim), critic()


class PyTorchGANWGANGPParams(WGANParams):
    family: Literal["pytorch_gan_wgan_gp"]  # type: ignore[assignment]


class PyTorchGANWGANGP(TanhImages, WGAN):
    family = "pytorch_gan_wgan_gp"
    Params = PyTorchGANWGANGPParams  # type: ignore[assignment]

    def __init__(self, params):
        GenerativeModel.__init__(self, params)
        self.generator, self.critic = generator(params.latent_dim), critic()


class ExamplesVAE(VAE):
    """The project's VAE class, which with arch mlp, hidden 400 and latent 20 is the examples' network, minus
    the project's one addition: the decoder's output bias started at the data's log-odds."""

    def init_from_data(self, images):
        pass  # PyTorch's default initialisation, as the examples have it


def baseline(family: str) -> tuple[str, config.ModelParams] | None:
    """The baseline recipe of a project family, or None where no peer recipe is named (ae, cvae, cwgan)."""
    if family not in RECIPES:
        return None
    name, section = RECIPES[family]
    return name, models.model_params(section, f"baseline of {family}")


def build_baseline(params: config.ModelParams) -> GenerativeModel:
    return ExamplesVAE(params) if params.family == "vae" else models.build_model(params)
