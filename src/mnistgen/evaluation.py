"""One evaluation path for all four models (the protocols of DESIGN.md, "Metric protocols").

Features of the reference images (test set, a training subset) are extracted once by the
train_evaluator stage and reused; each image set a model produces is embedded once, in
batches on the device, and every metric reads those features.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import figures, metrics
from .config import EvaluateParams
from .utils import progress_bar

if TYPE_CHECKING:  # types only: the report stage imports this module without any model family
    from .classifier import Classifier
    from .models.base import GenerativeModel


@dataclass
class Reference:
    """Evaluator outputs on real images, computed once per evaluator checkpoint."""

    test_feats: torch.Tensor
    test_probs: torch.Tensor
    train_feats: torch.Tensor
    train_probs: torch.Tensor
    evaluator_hash: str

    def __post_init__(self):
        self.test_stats = metrics.gaussian_stats(self.test_feats)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("test_feats", "test_probs", "train_feats", "train_probs", "evaluator_hash")}


@torch.no_grad()
def generate(fn, n: int, batch_size: int) -> torch.Tensor:
    """Concatenate fn(count) over batches: bounded memory for 10,000 images."""
    return torch.cat([fn(min(batch_size, n - i)) for i in range(0, n, batch_size)])


def sample_quality(feats, probs, ref: Reference, p: EvaluateParams) -> tuple[dict[str, float], list[int]]:
    """FID_cls, KID_cls, IS_cls, precision/recall and class coverage of one embedded image set, and its class histogram."""
    mu, sigma = metrics.gaussian_stats(feats)
    kid = metrics.kid(feats, ref.test_feats, p.kid_subsets, p.kid_subset_size, p.seed)
    score = metrics.inception_score(probs, p.is_splits)
    pr = metrics.precision_recall(ref.test_feats, feats, p.pr_k)
    coverage = metrics.class_coverage(probs.argmax(1))
    out = {
        "fid_cls": metrics.fid_from_stats(mu, sigma, *ref.test_stats),
        "kid_cls": kid["mean"], "kid_cls_std": kid["std"],
        "is_cls": score["mean"], "is_cls_std": score["std"],
        "precision": pr["precision"], "recall": pr["recall"],
        "classes_present": coverage["classes_present"], "class_tv_to_uniform": coverage["tv_to_uniform"],
        "confidence": probs.max(1).values.mean().item(),
    }
    return {k: float(v) for k, v in out.items()}, coverage["histogram"]


def real_data_row(ref: Reference, p: EvaluateParams) -> dict[str, float]:
    """The floor: a training subset scored against the test set as if it were a model's samples."""
    row, _ = sample_quality(ref.train_feats, ref.train_probs, ref, p)
    return row


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows of a and b at fractions t (for Gaussian latents)."""
    cos = (a * b).sum(1, keepdim=True) / (a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True)).clamp_min(1e-12)
    omega = cos.clamp(-1 + 1e-7, 1 - 1e-7).acos()
    t = t.view(1, -1, 1)
    a, b, omega = a[:, None], b[:, None], omega[:, None]
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(1, -1, 1)
    return (1 - t) * a[:, None] + t * b[:, None]


def interpolation_pairs(labels: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n fixed (seeded) pairs of test indices whose digits differ."""
    first = torch.randint(len(labels), (4 * n,), generator=generator)
    second = torch.randint(len(labels), (4 * n,), generator=generator)
    keep = (labels[first] != labels[second]).nonzero().squeeze(1)[:n]
    return first[keep], second[keep]


class Evaluation:
    """Evaluate one trained model; fills `self.metrics` and writes figures into `out`."""

    def __init__(self, model: GenerativeModel, classifier: Classifier, ref: Reference, p: EvaluateParams, out: Path):
        self.model, self.classifier, self.ref, self.p, self.out = model.eval(), classifier.eval(), ref, p, Path(out)
        self.device = model.device
        self.metrics: dict[str, float] = {}
        self.timings: dict[str, float] = {}
        self.out.mkdir(parents=True, exist_ok=True)

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.p.seed + offset)

    def timed(self, name, fn, *args):
        started = time.perf_counter()
        result = fn(*args)
        self.timings[name] = time.perf_counter() - started
        return result

    def embed(self, images):
        return self.classifier.features_and_probs(images, self.p.batch_size)

    @torch.no_grad()
    def prior_samples(self) -> None:
        gen = self.generator()
        images = generate(lambda n: self.model.sample(n, gen), self.p.num_samples, self.p.batch_size)
        feats, probs = self.embed(images)
        quality, histogram = sample_quality(feats, probs, self.ref, self.p)
        self.metrics.update(quality)
        figures.save_grid(images[:100], self.out / "samples.png", nrow=10)
        figures.class_histogram(histogram, self.out / "class_histogram.png", f"{self.model.family}: predicted classes of samples")

    @torch.no_grad()
    def reconstruction(self, test_x: torch.Tensor) -> None:
        """Per-pixel MSE and BCE over the whole test set (the VAE decodes its posterior mean)."""
        se = bce = 0.0
        for i in range(0, len(test_x), self.p.batch_size):
            x = test_x[i : i + self.p.batch_size]
            recon = self.model.decode(self.model.encode(x)).clamp(1e-6, 1 - 1e-6)
            se += (recon - x).square().sum().item()
            bce += torch.nn.functional.binary_cross_entropy(recon, x, reduction="sum").item()
        pixels = test_x.numel()
        self.metrics.update({"recon_mse": se / pixels, "recon_bce": bce / pixels})
        x = test_x[:16]
        figures.save_grid(torch.cat([x, self.model.decode(self.model.encode(x))]), self.out / "reconstructions.png", nrow=16)

    @torch.no_grad()
    def latent_scatter(self, test_x: torch.Tensor, test_y: torch.Tensor) -> None:
        n = min(5000, len(test_x))
        codes = torch.cat([self.model.encode(test_x[i : i + self.p.batch_size]) for i in range(0, n, self.p.batch_size)])
        figures.latent_scatter(codes, test_y[:n], self.out / "latent_scatter.png", f"{self.model.family} latent codes of test digits")

    @torch.no_grad()
    def interpolation(self, test_x: torch.Tensor, test_y: torch.Tensor) -> None:
        """Fixed pairs, `interp_steps` points each; confidence and FID_cls of the interior points."""
        p = self.p
        t = torch.linspace(0, 1, p.interp_steps, device=self.device)
        if self.model.has_encoder:  # encode fixed test pairs of different digits
            first, second = interpolation_pairs(test_y.cpu(), p.interp_pairs, torch.Generator().manual_seed(p.seed))
            z_a, z_b = self.model.encode(test_x[first.to(self.device)]), self.model.encode(test_x[second.to(self.device)])
        else:  # random latent pairs from the model's noise
            gen = self.generator(1)
            z_a, z_b = self.model.sample_latent(p.interp_pairs, gen), self.model.sample_latent(p.interp_pairs, gen)
        paths = {"linear": lerp}
        if self.model.gaussian_latent:  # slerp is for Gaussian latents
            paths["slerp"] = slerp
        for name, path in paths.items():
            z = path(z_a, z_b, t)  # [pairs, steps, latent]
            images = self.model.decode(z.flatten(0, 1)).view(len(z_a), p.interp_steps, 1, 28, 28)
            interior = images[:, 1:-1].flatten(0, 1)
            feats, probs = self.embed(interior)
            self.metrics[f"interp_{name}_confidence"] = probs.max(1).values.mean().item()
            self.metrics[f"interp_{name}_fid_cls"] = metrics.fid_from_stats(*metrics.gaussian_stats(feats), *self.ref.test_stats)
            midpoint = probs.view(len(z_a), -1, 10)[:, (p.interp_steps - 2) // 2].max(1).values  # one per pair
            self.metrics[f"interp_{name}_midpoint_confidence"] = midpoint.mean().item()
            self.metrics[f"interp_{name}_midpoint_confidence_stderr"] = (midpoint.std() / len(midpoint) ** 0.5).item()
            figures.save_grid(images[:10].flatten(0, 1), self.out / f"interpolation_{name}.png", nrow=p.interp_steps)

    @torch.no_grad()
    def likelihood(self, test_x: torch.Tensor) -> None:
        """VAE: negative ELBO on grey and on once-binarised test images, and the IWAE bound (nats per image)."""
        p = self.p
        binarised = torch.bernoulli(test_x, generator=self.generator(2)) if test_x.device.type == "cpu" else \
            (torch.rand(test_x.shape, generator=self.generator(2), device=self.device) < test_x).float()
        nelbo_grey = nelbo_bin = 0.0
        for i in range(0, len(test_x), p.batch_size):
            nelbo_grey += self.model.negative_elbo(test_x[i : i + p.batch_size])[2].sum().item()
            nelbo_bin += self.model.negative_elbo(binarised[i : i + p.batch_size])[2].sum().item()
        n_iwae = len(test_x) if p.iwae_images == 0 else min(p.iwae_images, len(test_x))
        images_per_call = 100
        chunk = max(1, min(p.iwae_k, 20_000 // images_per_call))  # ~20,000 decoder passes per call bounds memory
        nll = torch.cat([
            self.model.iwae_nll(binarised[i : i + images_per_call], p.iwae_k, chunk)
            for i in progress_bar(range(0, n_iwae, images_per_call), f"IWAE k={p.iwae_k}")
        ])
        self.metrics.update({
            "nelbo_grey": nelbo_grey / len(test_x),
            "nelbo_binarized": nelbo_bin / len(test_x),
            "iwae_nll": nll.mean().item(),
            "iwae_nll_stderr": (nll.std() / math.sqrt(len(nll))).item() if len(nll) > 1 else 0.0,
            "iwae_images": float(n_iwae),
            "iwae_k": float(p.iwae_k),
        })

    def run(self, test_x: torch.Tensor, test_y: torch.Tensor) -> dict[str, float]:
        self.timed("samples", self.prior_samples)
        self.timed("interpolation", self.interpolation, test_x, test_y)
        if self.model.has_encoder:
            self.timed("reconstruction", self.reconstruction, test_x)
            self.timed("latent_scatter", self.latent_scatter, test_x, test_y)
        if hasattr(self.model, "iwae_nll"):
            self.timed("likelihood", self.likelihood, test_x)
        return self.metrics
