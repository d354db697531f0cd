"""One evaluation path for all models (the protocols of DESIGN.md, "Metric protocols").

Features of the reference images (test set, a training subset) are extracted once by the
train_evaluator stage and reused; each image set a model produces is embedded once per
evaluator feature space, in batches on the device, and every metric reads those features.

Two feature spaces (two evaluators of different architecture and seed): a distance metric in
the first is named `fid_cls`, in the second `fid_cls_e2` (SPACES gives the suffixes). Each
distance comes with a bootstrap noise band `<name>_lo` .. `<name>_hi` (metrics.band).
A conditional model is also asked for each digit in turn (label fidelity, per-class FID_cls);
its unconditional metrics are those of a label-balanced mix, so they sit in the same table.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from sklearn.metrics import silhouette_samples

from . import figures, metrics
from .config import EvaluateParams
from .evaluators import FEATURE_SPACES, Classifier, read_spaces
from .utils import progress_bar

if TYPE_CHECKING:  # types only: the report stage imports this module without any model family
    from .models.base import GenerativeModel
    from .models.vae import VAE


@dataclass
class Reference:
    """Evaluator outputs on real images, computed once per evaluator checkpoint."""

    test_feats: torch.Tensor
    test_probs: torch.Tensor
    train_feats: torch.Tensor
    train_probs: torch.Tensor
    evaluator_hash: str
    test_stats: tuple[torch.Tensor, torch.Tensor] = field(init=False)  # the Gaussian fit of the test features

    def __post_init__(self):
        self.test_stats = metrics.gaussian_stats(self.test_feats)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("test_feats", "test_probs", "train_feats", "train_probs", "evaluator_hash")}


SPACES = {space.suffix: space.name for space in FEATURE_SPACES}  # metric-name suffix -> the feature space it is measured in


def load_references(folder: Path, device="cpu") -> dict[str, Reference]:
    """{suffix: Reference} for every feature space the train_evaluator stage wrote."""
    return {
        s["suffix"]: Reference(**torch.load(Path(folder) / s["reference"], map_location=device, weights_only=True))
        for s in read_spaces(folder)
    }


@torch.no_grad()
def generate(fn, n: int, batch_size: int) -> torch.Tensor:
    """Concatenate fn(count) over batches: bounded memory for 10,000 images."""
    return torch.cat([fn(min(batch_size, n - i)) for i in range(0, n, batch_size)])


def with_band(out: dict, key: str, value: float | torch.Tensor, replicates, p: EvaluateParams) -> None:
    out[key] = float(value)
    out[f"{key}_lo"], out[f"{key}_hi"] = metrics.band(float(value), replicates, p.bootstrap_level)


def distances(feats, ref: Reference, p: EvaluateParams, suffix: str = "") -> dict[str, float]:
    """FID_cls, KID_cls, precision and recall of one embedded image set in one feature space, each
    with its bootstrap band: the generated features are resampled (counts over them) and the
    metric recomputed from them, the reference fixed; recall's band resamples the real points it
    scores (the generated manifold as computed, since duplicates would shrink k-NN radii)."""
    counts = metrics.bootstrap_counts(len(feats), p.bootstrap, p.bootstrap_seed)
    real_counts = metrics.bootstrap_counts(len(ref.test_feats), p.bootstrap, p.bootstrap_seed + 1)
    out: dict[str, float] = {}
    fid = metrics.fid_from_stats(*metrics.gaussian_stats(feats), *ref.test_stats)
    with_band(out, f"fid_cls{suffix}", fid, metrics.fid_replicates(feats, *ref.test_stats, counts), p)
    kid = metrics.kid_with_replicates(feats, ref.test_feats, p.kid_subsets, p.kid_subset_size, p.seed, counts)
    with_band(out, f"kid_cls{suffix}", kid["mean"], kid["replicates"], p)
    out[f"kid_cls{suffix}_std"] = kid["std"]
    fake_inside, real_inside = metrics.inside_flags(ref.test_feats, feats, p.pr_k)
    with_band(out, f"precision{suffix}", fake_inside.mean(), metrics.fraction_replicates(fake_inside, counts), p)
    with_band(out, f"recall{suffix}", real_inside.mean(), metrics.fraction_replicates(real_inside, real_counts), p)
    return out


def sample_quality(
    embedded: dict[str, tuple], refs: dict[str, Reference], p: EvaluateParams
) -> tuple[dict[str, float], list[int]]:
    """Every sample-quality metric of one image set: distances (with bands) in each feature space
    (`embedded[suffix] = (feats, probs)`), and from the first evaluator's classes IS_cls, class
    coverage and confidence. Returns the metrics and the class histogram."""
    out: dict[str, float] = {}
    for suffix, ref in refs.items():
        out.update(distances(embedded[suffix][0], ref, p, suffix))
    probs = embedded[""][1]
    score = metrics.inception_score(probs, p.is_splits)
    coverage = metrics.class_coverage(probs.argmax(1))
    out.update(
        {
            "is_cls": score["mean"],
            "is_cls_std": score["std"],
            "classes_present": coverage["classes_present"],
            "class_tv_to_uniform": coverage["tv_to_uniform"],
            "confidence": probs.max(1).values.mean().item(),
        }
    )
    return {k: float(v) for k, v in out.items()}, coverage["histogram"]


def real_data_row(refs: dict[str, Reference], p: EvaluateParams) -> dict[str, float]:
    """The floor: a training subset scored against the test set as if it were a model's samples, in every space."""
    row, _ = sample_quality({s: (r.train_feats, r.train_probs) for s, r in refs.items()}, refs, p)
    return row


def binarize(x: torch.Tensor, seed: int) -> torch.Tensor:
    """One fixed Bernoulli draw of grey images (evaluate.binarize_seed), the same on every run."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return (torch.rand(x.shape, generator=gen, device=x.device) < x).float()


def likelihood_subset(n: int, images: int, seed: int) -> torch.Tensor:
    """Indices of the test images the -ELBO and the IWAE bound both use: all (images = 0 or >= n), else a seeded random subset."""
    if images == 0 or images >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:images].sort().values


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

    def __init__(
        self, model: GenerativeModel, classifiers: dict[str, Classifier], refs: dict[str, Reference], p: EvaluateParams, out: Path
    ):
        """`classifiers` and `refs` map each feature space's suffix (SPACES) to its evaluator and reference."""
        if set(classifiers) != set(refs) or "" not in refs:
            raise ValueError(f"one classifier per reference, the first space included: {sorted(classifiers)} vs {sorted(refs)}")
        self.model, self.p, self.out = model.eval(), p, Path(out)
        self.classifiers, self.refs = {k: c.eval() for k, c in classifiers.items()}, refs
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

    def embed(self, images) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{suffix: (features, probabilities)} of images in every feature space."""
        return {s: c.features_and_probs(images, self.p.batch_size) for s, c in self.classifiers.items()}

    @torch.no_grad()
    def prior_samples(self) -> None:
        gen = self.generator()
        images = generate(lambda n: self.model.sample(n, gen), self.p.num_samples, self.p.batch_size)
        quality, histogram = sample_quality(self.embed(images), self.refs, self.p)
        self.metrics.update(quality)
        self.metrics.update(metrics.sharpness(images, self.p.batch_size))
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
        figures.latent_scatter(
            codes, test_y[:n], self.out / "latent_scatter.png", f"{self.model.family} latent codes of test digits", means=means
        )
        silhouette = torch.as_tensor(silhouette_samples(codes.double().cpu().numpy(), test_y[:n].cpu().numpy()))
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
        feats, probs = self.embed(images)[""]  # the first evaluator's space: label fidelity and per-class FID_cls
        ref = self.refs[""]
        # The reference features are those of the first len(test_feats) test images (train_evaluator), so these are their labels.
        ref_y = test_y[: len(ref.test_feats)].to(ref.test_feats.device)
        fidelity = metrics.label_fidelity(probs, labels)
        self.metrics["label_fidelity"] = fidelity
        self.metrics["label_fidelity_stderr"] = math.sqrt(fidelity * (1 - fidelity) / len(labels))
        per_class = []
        for digit in range(10):
            mine = labels == digit
            per_class.append(metrics.fid(feats[mine], ref.test_feats[ref_y == digit]))
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
    def interpolation(self, val_x: torch.Tensor, val_y: torch.Tensor) -> None:
        """Fixed pairs, `interp_steps` points each; confidence and FID_cls of the interior points in each space.

        Every family scores the same count of interior points (interp_pairs x (interp_steps - 2)); an AE
        or VAE encodes pairs of held-out validation digits, not the test images the FID reference is
        made of. The points of one path are correlated, so the FID band resamples whole paths. These
        FIDs compare interpolations between models; they are not on FID_cls's scale (fewer, correlated points).
        """
        p = self.p
        t = torch.linspace(0, 1, p.interp_steps, device=self.device)
        if self.model.has_encoder:  # encode fixed held-out pairs of different digits
            first, second = interpolation_pairs(val_y.cpu(), p.interp_pairs, torch.Generator().manual_seed(p.seed))
            z_a, z_b = self.model.encode(val_x[first.to(self.device)]), self.model.encode(val_x[second.to(self.device)])
        else:  # random latent pairs from the model's noise
            gen = self.generator(1)
            z_a, z_b = self.model.sample_latent(p.interp_pairs, gen), self.model.sample_latent(p.interp_pairs, gen)
        # A conditional model holds each pair's digit fixed along its path (pair i: digit i mod 10); the CVAE's
        # decoder ignores it, as its digit lives in the encoded codes.
        labels = (torch.arange(len(z_a), device=self.device) % 10).repeat_interleave(p.interp_steps)
        decode = (lambda z: self.model.decode(z, labels)) if self.model.conditional else self.model.decode  # type: ignore[call-arg]
        paths = {"linear": lerp}
        if self.model.gaussian_latent:  # slerp is for Gaussian latents
            paths["slerp"] = slerp
        interior_steps = p.interp_steps - 2
        counts = metrics.bootstrap_counts(len(z_a) * interior_steps, p.bootstrap, p.bootstrap_seed, groups=interior_steps)
        for name, path in paths.items():
            z = path(z_a, z_b, t)  # [pairs, steps, latent]
            images = decode(z.flatten(0, 1)).view(len(z_a), p.interp_steps, 1, 28, 28)
            embedded = self.embed(images[:, 1:-1].flatten(0, 1))
            for suffix, (feats, _) in embedded.items():
                stats = self.refs[suffix].test_stats
                with_band(
                    self.metrics,
                    f"interp_{name}_fid_cls{suffix}",
                    metrics.fid_from_stats(*metrics.gaussian_stats(feats), *stats),
                    metrics.fid_replicates(feats, *stats, counts),
                    p,
                )
            self.metrics[f"interp_{name}_confidence"] = embedded[""][1].max(1).values.mean().item()
            for suffix, (_, probs) in embedded.items():  # how recognisable the midpoint is, to each evaluator
                midpoint = probs.view(len(z_a), -1, 10)[:, (p.interp_steps - 2) // 2].max(1).values  # one per pair
                self.metrics[f"interp_{name}_midpoint_confidence{suffix}"] = midpoint.mean().item()
                self.metrics[f"interp_{name}_midpoint_confidence{suffix}_stderr"] = (midpoint.std() / len(midpoint) ** 0.5).item()
            figures.save_grid(images[:10].flatten(0, 1), self.out / f"interpolation_{name}.png", nrow=p.interp_steps)
        self.metrics["interp_points"] = float(len(z_a) * interior_steps)

    @torch.no_grad()
    def likelihood(self, test_x: torch.Tensor, test_y: torch.Tensor) -> None:
        """VAE: negative ELBO on grey and on once-binarised test images, and the IWAE bound (nats per image),
        all three on the same test images (likelihood_subset: all, or `iwae_images` of them drawn with evaluate.seed).
        The CVAE's are bounds on -log p(x | y), given each image's label."""
        p = self.p
        vae = cast("VAE", self.model)  # the families with a likelihood: the VAE and the CVAE
        binarised_all = binarize(
            test_x, p.binarize_seed
        )  # binarise every image once, then pick: an image's draw does not depend on the subset
        idx = likelihood_subset(len(test_x), p.iwae_images, p.seed + 3).to(test_x.device)
        grey, binarised = test_x[idx], binarised_all[idx]
        y = test_y[idx] if self.model.conditional else None
        n = len(idx)

        def labels(i, count):
            return None if y is None else y[i : i + count]

        nelbo_grey = torch.cat(
            [vae.negative_elbo(grey[i : i + p.batch_size], y=labels(i, p.batch_size))[2] for i in range(0, n, p.batch_size)]
        )
        nelbo_bin = torch.cat(
            [vae.negative_elbo(binarised[i : i + p.batch_size], y=labels(i, p.batch_size))[2] for i in range(0, n, p.batch_size)]
        )
        images_per_call = 100
        chunk = max(1, min(p.iwae_k, 20_000 // images_per_call))  # ~20,000 decoder passes per call bounds memory
        nll = torch.cat(
            [
                vae.iwae_nll(
                    binarised[i : i + images_per_call], p.iwae_k, chunk, y=labels(i, images_per_call)
                )  # slices stop at n: no image past the subset
                for i in progress_bar(range(0, n, images_per_call), f"IWAE k={p.iwae_k}")
            ]
        )

        def stderr(values):
            return (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else 0.0

        self.metrics.update(
            {
                "nelbo_grey": nelbo_grey.mean().item(),
                "nelbo_grey_stderr": stderr(nelbo_grey),
                "nelbo_binarized": nelbo_bin.mean().item(),
                "nelbo_binarized_stderr": stderr(nelbo_bin),
                "iwae_nll": nll.mean().item(),
                "iwae_nll_stderr": stderr(nll),
                "iwae_images": float(len(nll)),
                "likelihood_images": float(n),
                "likelihood_all_test_images": float(n == len(test_x)),
                "iwae_k": float(p.iwae_k),
            }
        )

    def run(self, test_x: torch.Tensor, test_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor) -> dict[str, float]:
        """Every metric; val_x/val_y (held out from training and from the FID reference) start the AE/VAE interpolations."""
        self.timed("samples", self.prior_samples)
        if self.model.conditional:
            self.timed("conditional", self.conditional_samples, test_y)
        self.timed("interpolation", self.interpolation, val_x, val_y)
        if self.model.has_encoder:
            self.timed("reconstruction", self.reconstruction, test_x)
            self.timed("latent_scatter", self.latent_scatter, test_x, test_y)
        if hasattr(self.model, "iwae_nll"):
            self.timed("likelihood", self.likelihood, test_x, test_y)
        return self.metrics
