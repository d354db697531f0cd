"""What the shared training loop and evaluation expect of every model family."""

from __future__ import annotations

import torch
from torch import nn

from .. import distributed
from ..config import ModelParams

Losses = dict[str, torch.Tensor]  # detached scalar tensors, read once per epoch (no per-step sync)
FAMILIES: dict[str, type[GenerativeModel]] = {}  # name -> class, filled as each family's file is imported
NUM_CLASSES = 10  # the digits a conditional family can be asked for


def balanced_labels(n: int, device=None) -> torch.Tensor:
    """0, 1, ..., 9, 0, 1, ...: the label-balanced mix a conditional model samples when given no digit."""
    return torch.arange(n, device=device) % NUM_CLASSES


class GenerativeModel(nn.Module):
    """A model the harness can train, checkpoint, sample and decode.

    Subclasses set `family` and `Params` (their own params class, whose `family` field is
    Literal[family]) and implement make_optimizers, train_step, validation_losses, decode
    and, where they have an encoder, encode. Defining the class registers the family.

    A conditional family (`conditional = True`) is asked for a digit: the harness passes the
    batch's labels as `train_step(x, optimizers, step, y)` and `validation_losses(x, y)`, its
    `decode(z, labels)` takes the digits, and `noise_to_latent(eps, labels)` turns the noise
    `sample_latent` draws into the latent for those digits (the CVAE adds its class mean).
    """

    family: str = ""
    Params: type[ModelParams] = ModelParams
    has_encoder: bool = False
    twice_differentiated: tuple[str, ...] = ()  # submodules whose loss needs a double backward: torch.compile cannot take them
    gaussian_latent: bool = True  # sample_latent draws from N(0, I): slerp paths make sense
    conditional: bool = False  # trained on (image, label) pairs and sampled for a requested digit

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "family" in cls.__dict__:
            FAMILIES[cls.family] = cls

    def __init__(self, params: ModelParams):
        super().__init__()
        self.params = params
        self.latent_dim = params.latent_dim

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def init_from_data(self, images: torch.Tensor) -> None:
        """Data-dependent initialisation before the first step (default: none)."""

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

        The noise is drawn on the generator's device and moved to the model's: an evaluation draws on a CPU
        generator, so its numbers do not depend on the device. In a training step of a data-parallel run
        (no generator: the device's own) the n rows are this rank's share of the global batch's draw (distributed.rows).
        """
        where = self.device if generator is None else generator.device
        return distributed.rows(n, lambda m: torch.randn(m, self.latent_dim, generator=generator, device=where)).to(self.device)

    def averaged(self) -> nn.Module:
        """The weights that make samples, which `ema_decay` averages over steps: the whole model (AE, VAE);
        a GAN overrides it with its generator (averaging the critic would change nothing that samples)."""
        return self

    def fit_prior(self, images: torch.Tensor) -> None:
        """Called once after training with the whole training set; the AE fits its Gaussian here."""

    def noise_to_latent(self, eps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Conditional families: the latent of digits `labels` for noise `eps` (default: the noise itself)."""
        return eps

    def decode_noise(self, eps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Conditional families: digits `labels` in the style `eps` (one noise vector and one digit per row)."""
        return self.decode(self.noise_to_latent(eps, labels), labels)  # type: ignore[call-arg]  # a conditional decode

    def class_latent_means(self) -> torch.Tensor | None:
        """The learned latent mean of each digit [10, latent] where a family has them (the CVAE), else None."""
        return None

    @torch.no_grad()
    def decode_draws(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images from draws of sample_latent; a conditional family makes digits `labels` (default: a label-balanced mix)."""
        if not self.conditional:
            return self.decode(z)
        labels = balanced_labels(len(z), self.device) if labels is None else labels.to(self.device)
        return self.decode_noise(z, labels)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """n samples from the prior; a conditional family gives digits `labels` (default: a label-balanced mix)."""
        return self.decode_draws(self.sample_latent(n, generator), labels)


def bce_per_image(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bernoulli negative log-likelihood of each image, summed over pixels (nats)."""
    loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return loss.flatten(1).sum(1)


def adam(params, lr: float, betas=(0.9, 0.999)) -> torch.optim.Adam:
    # fused: one kernel for the whole update; on this 2-core CPU it makes an MLP VAE step 12 % faster.
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), fused=True)


@torch.no_grad()
def init_output_bias(decoder: nn.Module, images: torch.Tensor) -> None:
    """Start a Bernoulli decoder at the data's mean: its output bias = log-odds of the mean pixel.

    Per pixel where the last layer has one bias per pixel (MLP), else the mean over all pixels
    (conv). As in Burda et al.'s IWAE code; it lowers the MLP VAE's test -ELBO after 5 epochs
    by about 1 nat (benchmarks/vae_time_to_elbo.py --no-bias-init).
    """
    bias = [m.bias for m in decoder.modules() if isinstance(getattr(m, "bias", None), torch.Tensor)][-1]
    assert isinstance(bias, torch.Tensor)
    per_pixel = bias.numel() == images[0].numel()
    mean = images.float().mean(0).flatten() if per_pixel else images.float().mean().reshape(1)
    bias.copy_(torch.logit(mean.clamp(1e-3, 1 - 1e-3)).to(bias))
