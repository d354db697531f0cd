"""One evaluation path for all models (the protocols of DESIGN.md, "Metric protocols").

Features of the reference images (test set, a training subset) are extracted once by the
train_evaluator stage and reused; each image set a model produces is embedded once, in
batches on the device, and every metric reads those features. A conditional model is also
asked for each digit in turn (label fidelity, per-class FID_cls); its unconditional metrics
are those of a label-balanced mix, so they sit in the same table as the other models.
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
        """The codes of (up to) 5,000 test digits: a scatter coloured by digit (with the learned class means,
        where the model has them), and how well they cluster by digit (silhouette, Euclidean, on the codes
        themselves, the same computation for every model with an encoder)."""
        n = min(5000, len(test_x))
        codes = torch.cat([self.model.encode(test_x[i : min(i + self.p.batch_size, n)]) for i in range(0, n, self.p.batch_size)])
        means = self.model.class_latent_means()
        figures.latent_scatter(codes, test_y[:n], self.out / "latent_scatter.png", f"{self.model.family} latent codes of test digits",
                               means=means)
        silhouette = metrics.silhouette_samples(codes, test_y[:n])
        self.metrics["latent_silhouette"] = silhouette.mean().item()
        self.metrics["latent_silhouette_stderr"] = (silhouette.std() / math.sqrt(len(silhouette))).item()

    @torch.no_grad()
    def conditional_samples(self, test_y: torch.Tensor) -> None:
        """Conditional models: `per_class_samples` samples asked for each digit; label fidelity (the evaluator's
        accuracy on them) and FID_cls of each digit's samples against that digit's test images; figures."""
        p = self.p
        labels = torch.arange(10, device=self.device).repeat_interleave(p.per_class_samples)
        gen = self.generator(3)
        images = torch.cat([self.model.sample(len(chunk), gen, chunk) for chunk in labels.split(p.batch_size)])
        feats, probs = self.embed(images)
        # The reference features are those of the first len(test_feats) test images (train_evaluator), so these are their labels.
        ref_y = test_y[: len(self.ref.test_feats)].to(self.ref.test_feats.device)
        fidelity = metrics.label_fidelity(probs, labels)
        self.metrics["label_fidelity"] = fidelity
        self.metrics["label_fidelity_stderr"] = math.sqrt(fidelity * (1 - fidelity) / len(labels))
        per_class = []
        for digit in range(10):
            mine = labels == digit
            per_class.append(metrics.fid(feats[mine], self.ref.test_feats[ref_y == digit]))
            self.metrics[f"fid_cls_digit_{digit}"] = per_class[-1]
            self.metrics[f"label_fidelity_digit_{digit}"] = metrics.label_fidelity(probs[mine], labels[mine])
        self.metrics["fid_cls_per_class_mean"] = sum(per_class) / len(per_class)
        by_class = images.view(10, p.per_class_samples, 1, 28, 28)[:, :12]  # one row per digit
        figures.save_grid(by_class.flatten(0, 1), self.out / "samples_by_class.png", nrow=by_class.shape[1])
        # One row per noise vector, one column per digit: the same z (style) across a row.
        eps = self.model.sample_latent(8, self.generator(4))
        grid = torch.stack([self.model.decode_noise(eps, torch.full((8,), d, device=self.device)) for d in range(10)], dim=1)
        figures.save_grid(grid.flatten(0, 1), self.out / "digit_grid.png", nrow=10)

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
        # A conditional model holds each pair's digit fixed along its path (pair i: digit i mod 10); the CVAE's
        # decoder ignores it, as its digit lives in the encoded codes.
        labels = (torch.arange(len(z_a), device=self.device) % 10).repeat_interleave(p.interp_steps)
        decode = (lambda z: self.model.decode(z, labels)) if self.model.conditional else self.model.decode
        paths = {"linear": lerp}
        if self.model.gaussian_latent:  # slerp is for Gaussian latents
            paths["slerp"] = slerp
        for name, path in paths.items():
            z = path(z_a, z_b, t)  # [pairs, steps, latent]
            images = decode(z.flatten(0, 1)).view(len(z_a), p.interp_steps, 1, 28, 28)
            interior = images[:, 1:-1].flatten(0, 1)
            feats, probs = self.embed(interior)
            self.metrics[f"interp_{name}_confidence"] = probs.max(1).values.mean().item()
            self.metrics[f"interp_{name}_fid_cls"] = metrics.fid_from_stats(*metrics.gaussian_stats(feats), *self.ref.test_stats)
            midpoint = probs.view(len(z_a), -1, 10)[:, (p.interp_steps - 2) // 2].max(1).values  # one per pair
            self.metrics[f"interp_{name}_midpoint_confidence"] = midpoint.mean().item()
            self.metrics[f"interp_{name}_midpoint_confidence_stderr"] = (midpoint.std() / len(midpoint) ** 0.5).item()
            figures.save_grid(images[:10].flatten(0, 1), self.out / f"interpolation_{name}.png", nrow=p.interp_steps)

    @torch.no_grad()
    def likelihood(self, test_x: torch.Tensor, test_y: torch.Tensor) -> None:
        """VAE: negative ELBO on grey and on once-binarised test images, and the IWAE bound (nats per image).
        The CVAE's are bounds on -log p(x | y), given each image's label."""
        p = self.p
        y = test_y if self.model.conditional else None

        def labels(i, n):
            return None if y is None else y[i : i + n]

        binarised = torch.bernoulli(test_x, generator=self.generator(2)) if test_x.device.type == "cpu" else \
            (torch.rand(test_x.shape, generator=self.generator(2), device=self.device) < test_x).float()
        nelbo_grey = nelbo_bin = 0.0
        for i in range(0, len(test_x), p.batch_size):
            nelbo_grey += self.model.negative_elbo(test_x[i : i + p.batch_size], y=labels(i, p.batch_size))[2].sum().item()
            nelbo_bin += self.model.negative_elbo(binarised[i : i + p.batch_size], y=labels(i, p.batch_size))[2].sum().item()
        n_iwae = len(test_x) if p.iwae_images == 0 else min(p.iwae_images, len(test_x))
        images_per_call = 100
        chunk = max(1, min(p.iwae_k, 20_000 // images_per_call))  # ~20,000 decoder passes per call bounds memory
        nll = torch.cat([
            self.model.iwae_nll(binarised[i : i + images_per_call], p.iwae_k, chunk, y=labels(i, images_per_call))
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
        if self.model.conditional:
            self.timed("conditional", self.conditional_samples, test_y)
        self.timed("interpolation", self.interpolation, test_x, test_y)
        if self.model.has_encoder:
            self.timed("reconstruction", self.reconstruction, test_x)
            self.timed("latent_scatter", self.latent_scatter, test_x, test_y)
        if hasattr(self.model, "iwae_nll"):
            self.timed("likelihood", self.likelihood, test_x, test_y)
        return self.metrics
