"""The objectives: VAE KL and reparameterisation, WGAN gradient penalties, and that every model learns."""

import pytest
import torch
from helpers import tiny
from torch import nn

from mnistgen.models import FAMILIES, build_model
from mnistgen.models.vae import kl_divergence, reparameterize
from mnistgen.models.wgan import autograd_norm, difference_quotient, penalty, per_sample_uniform


def test_kl_matches_closed_form_and_is_zero_at_prior():
    torch.manual_seed(0)
    mu, logvar = torch.randn(6, 4), torch.randn(6, 4)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(4), torch.ones(4))
    expected = torch.distributions.kl_divergence(q, p).sum(1)
    assert torch.allclose(kl_divergence(mu, logvar), expected, atol=1e-5)
    assert torch.allclose(kl_divergence(torch.zeros(3, 4), torch.zeros(3, 4)), torch.zeros(3))


def test_gradients_reach_the_encoder_through_the_sample():
    torch.manual_seed(0)
    vae = build_model(tiny("vae", hidden=32, latent_dim=3))
    x = torch.rand(8, 1, 28, 28)
    mu, logvar = vae.posterior(x)
    z = reparameterize(mu, logvar)
    vae.decoder(z).sum().backward()  # reconstruction only: no KL path to the encoder
    assert vae.encoder[1].weight.grad is not None and vae.encoder[1].weight.grad.abs().sum() > 0


class Linear(nn.Module):
    """D(x) = w . x, whose gradient norm is ||w|| everywhere."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w

    def forward(self, x):
        return (x.flatten(1) * self.w).sum(1, keepdim=True)


def test_two_sided_penalty_of_linear_critic_is_exact():
    torch.manual_seed(0)
    w = torch.randn(784) * 0.1
    norm = autograd_norm(Linear(w), torch.rand(16, 1, 28, 28), torch.rand(16, 1, 28, 28))
    assert torch.allclose(norm, w.norm().expand(16), rtol=1e-5)
    assert penalty(norm, 10.0, one_sided=False).item() == pytest.approx(10.0 * (w.norm().item() - 1) ** 2, rel=1e-4)


def test_one_sided_penalty_is_zero_below_one():
    w = torch.full((784,), 0.5 / 28.0)  # ||w|| = 0.5
    norm = autograd_norm(Linear(w), torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28))
    assert penalty(norm, 10.0, one_sided=True).item() == 0.0
    assert penalty(norm, 10.0, one_sided=False).item() == pytest.approx(2.5, rel=1e-4)


def test_finite_difference_penalty_equals_autograd():
    """Along a segment parallel to w, |D(y1) - D(y2)| / ||y1 - y2|| is exactly ||w||."""
    torch.manual_seed(0)
    w = torch.randn(784) * 0.1
    fake = torch.rand(16, 1, 28, 28)
    real = fake + torch.rand(16, 1, 1, 1) * w.view(1, 1, 28, 28)  # real - fake parallel to w
    critic = Linear(w)
    fd, ag = difference_quotient(critic, real, fake), autograd_norm(critic, real, fake)
    assert torch.allclose(fd, ag, rtol=1e-4)
    for one_sided in (False, True):
        assert penalty(fd, 10.0, one_sided).item() == pytest.approx(penalty(ag, 10.0, one_sided).item(), rel=1e-3)


def test_eps_is_drawn_per_sample_not_per_pixel():
    torch.manual_seed(0)
    real, fake = torch.rand(32, 1, 28, 28), torch.rand(32, 1, 28, 28)
    assert per_sample_uniform(real).shape == (32, 1, 1, 1)
    seen = []

    class Recorder(nn.Module):
        def forward(self, y):
            seen.append(y.detach())
            return y.flatten(1).sum(1, keepdim=True)

    autograd_norm(Recorder(), real, fake)
    ratio = (seen[0] - fake) / (real - fake)  # each sample's eps, read back pixel by pixel
    assert ratio.flatten(1).std(1).max() < 1e-4  # one eps per sample
    assert ratio.flatten(1).mean(1).std() > 0.1  # but different eps across samples


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_few_steps_lower_the_loss(family):
    """Autoencoders: reconstruction loss; GANs: the discriminator's (critic's) loss on a fixed batch.
    A conditional family gets the batch's labels too."""
    torch.manual_seed(0)
    x = (torch.rand(32, 1, 28, 28) > 0.7).float() * torch.linspace(0, 1, 28).view(1, 1, 1, 28)
    model = build_model(tiny(family, arch="conv", width=4, lr=2e-3))
    optimizers = model.make_optimizers()
    key = "d_loss" if hasattr(model, "critic") else "loss"
    labels = (torch.arange(32) % 10,) if model.conditional else ()

    def measured():
        torch.manual_seed(1)  # the same fake batch and eps each time
        return model.validation_losses(x, *labels)[key].item()

    model.eval()
    before = measured()
    model.train()
    for step in range(30):
        model.train_step(x, optimizers, step, *labels)
    model.eval()
    assert measured() < before


def test_ae_prior_is_fitted_to_codes():
    torch.manual_seed(0)
    ae = build_model(tiny("ae", arch="conv", width=4)).eval()
    x = torch.rand(500, 1, 28, 28)
    ae.fit_prior(x)
    codes = ae.encode(x)
    assert torch.allclose(ae.prior_mean, codes.mean(0), atol=1e-4)
    samples = ae.sample_latent(20000, torch.Generator().manual_seed(0))
    assert torch.allclose(samples.mean(0), codes.mean(0), atol=0.05 * codes.std().item())
    assert torch.allclose(torch.cov(samples.T), torch.cov(codes.T), atol=0.1 * torch.cov(codes.T).abs().max().item())


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("family", ["ae", "vae"])
def test_decoder_starts_at_the_data_mean(family, arch):
    """init_from_data sets the decoder's output bias to the log-odds of the mean pixel."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 1, 28, 28, generator=g) * torch.linspace(0.05, 0.95, 784).view(1, 1, 28, 28)
    model = build_model(tiny(family, arch=arch, width=4, hidden=32, latent_dim=16))
    model.init_from_data(images)
    last = [m for m in model.decoder.modules() if getattr(m, "bias", None) is not None][-1]
    mean = images.mean(0).flatten() if arch == "mlp" else images.mean().reshape(1)
    torch.testing.assert_close(torch.sigmoid(last.bias), mean, atol=1e-5, rtol=1e-4)
    if arch == "mlp":  # with zero weights into the last layer, the decoder outputs the mean image
        nn.init.zeros_(last.weight)
        torch.testing.assert_close(
            model.decode(torch.randn(2, model.latent_dim)), mean.view(1, 1, 28, 28).expand(2, -1, -1, -1), atol=1e-5, rtol=1e-4
        )


def test_init_from_data_leaves_a_gan_as_built():
    model = build_model(tiny("gan", arch="conv", width=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.init_from_data(torch.rand(16, 1, 28, 28))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_finite_difference_penalty_is_fp32_under_bf16_autocast():
    """A critic exactly 1-Lipschitz along every real-fake segment, at a score offset of 100: the difference quotient
    is 1 and the penalty ~0. Computed from bf16 scores (resolution 0.5 at 100) it would be far from 0."""
    from mnistgen.models.wgan import difference_quotient, penalty

    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 1, 28, 28, generator=g)
    u /= u.norm()
    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 1))
    with torch.no_grad():
        critic[1].weight.copy_(u.flatten()[None])
        critic[1].bias.fill_(100.0)
    real = torch.rand(64, 1, 28, 28, generator=g)
    fake = real - torch.rand(64, 1, 1, 1, generator=g) * 2 * u  # each segment points along u: D changes at rate 1
    eps1, eps2 = torch.rand(64, 1, 1, 1, generator=g), torch.rand(64, 1, 1, 1, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert critic(real).dtype == torch.bfloat16  # autocast is really on for the critic
        norm = difference_quotient(critic, real, fake, eps1, eps2)
        naive = critic(torch.cat([eps1 * real + (1 - eps1) * fake, eps2 * real + (1 - eps2) * fake])).float().squeeze(1)
    assert torch.allclose(norm, torch.ones(64), atol=1e-3)
    assert penalty(norm, 10.0, one_sided=False).item() < 1e-4
    d1, d2 = naive.chunk(2)
    naive_norm = (d1 - d2).abs() / ((eps1 - eps2).abs().flatten() * (real - fake).flatten(1).norm(dim=1))
    assert penalty(naive_norm, 10.0, one_sided=False).item() > 0.5  # what the bf16 scores gave: the test has teeth


@pytest.mark.parametrize("family", ["gan", "wgan", "cwgan"])
def test_the_critic_has_its_own_width_and_learning_rate(family):
    """critic_width sizes the critic's convs and critic_lr its optimiser (TTUR); width and lr stay the generator's."""
    model = build_model(tiny(family, arch="conv", width=6, critic_width=5, lr=0.001, critic_lr=0.003))
    critic_convs = [m for m in model.critic.modules() if isinstance(m, nn.Conv2d)]
    generator_convs = [m for m in model.generator.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [c.out_channels for c in critic_convs] == [5, 10]
    assert [c.out_channels for c in generator_convs] == [6, 1]
    optimizers = model.make_optimizers()
    assert optimizers["critic"].param_groups[0]["lr"] == 0.003
    assert optimizers["generator"].param_groups[0]["lr"] == 0.001
