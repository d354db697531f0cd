"""The cases of the data-parallel equivalence test, shared by the test and its worker processes."""

import torch
from helpers import tiny

# name -> (family, param changes): every family, the VAE's Bernoulli draw, the WGAN's two penalty gradients, the EMA.
CASES = {
    "ae": ("ae", {}),
    "vae": ("vae", {"dynamic_binarization": True}),
    "gan": ("gan", {}),
    "wgan": ("wgan", {"gradient": "autograd"}),
    "wgan_fd": ("wgan", {"gradient": "finite_difference"}),
    "cvae": ("cvae", {}),
    "cwgan": ("cwgan", {"gradient": "autograd"}),
    "gan_ema": ("gan", {"ema_decay": 0.9}),  # the moving average of the generator, kept alike on every rank
}
GLOBAL_BATCH = 16
EPOCHS = 2  # 16 steps each: the ranks' random streams must stay in step across the validation between epochs


def params(family: str, **changes):
    """A tiny conv model (batch norm 2d in the GAN's critic, 1d and 2d in the generators), warm-up and decay; fp32 on
    every CPU: the check is the batch split, and bf16 rounding would amplify the ranks' summation order."""
    return tiny(
        family,
        arch="conv",
        width=4,
        epochs=EPOCHS,
        batch_size=GLOBAL_BATCH,
        lr_warmup=0.5,
        lr_decay=True,
        precision="fp32",
        **changes,
    )


def data(n: int = 256, n_val: int = 40):
    """Train images and labels, validation images and labels: the same in every process."""
    g = torch.Generator().manual_seed(0)
    images, val_images = torch.rand(n, 1, 28, 28, generator=g), torch.rand(n_val, 1, 28, 28, generator=g)
    return images, torch.arange(n) % 10, val_images, torch.arange(n_val) % 10
