"""One evaluation path for all models (the protocols of DESIGN.md, "Metric protocols").

Each split has one role. The validation split is what choices read (the gate, the sweep, the
quality benchmark); the test split is read only by the final report. A model is evaluated on both
with the same samples: the reference images, the reconstructed and the likelihood-scored images
are the split's own. Features of the reference images are extracted once by the reference stage
(the pinned evaluators) and reused; each image set a model produces is embedded once per feature
space, in batches on the device, and every metric reads those features.

Two feature spaces (two evaluators of different architecture and seed): a distance metric in
the first is named `fid_cls`, in the second `fid_cls_e2` (SPACES gives the suffixes). Each
distance comes with a bootstrap noise band `<name>_lo` .. `<name>_hi` (metrics.band).
A conditional model is also asked for each digit in turn (label fidelity, per-class FID_cls);
its unconditional metrics are those of a label-balanced mix, so they sit in the same table.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from . import data, evaluators, figures, likelihood, metrics, protocol
from .config import EvaluateParams
from .evaluators import Classifier, read_spaces
from .utils import StageError, memory_format

if TYPE_CHECKING:  # types only: the report stage imports this module without any model family
    from .models.base import GenerativeModel
    from .models.vae import VAE


SPLITS = ("val", "test")  # validation chooses, test reports
EVIDENCE = "evidence.pt"  # in a model's figures folder (and its run's evaluation/ artifacts): what a paired comparison resamples


@dataclass
class Reference:
    """One feature space's evaluator outputs on the real images of one split (and on a training subset, the
    real-data row), computed once by the reference stage."""

    feats: torch.Tensor
    probs: torch.Tensor
    train_feats: torch.Tensor
    train_probs: torch.Tensor
    evaluator_hash: str
    split: str = "test"
    stats: tuple[torch.Tensor, torch.Tensor] = field(init=False)  # the Gaussian fit of the split's features

    def __post_init__(self):
        self.stats = metrics.gaussian_stats(self.feats)


def load_references(folder: Path, split: str, device="cpu") -> dict[str, Reference]:
    """{suffix: Reference} of `split` (val or test) for every feature space the reference stage wrote."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: one of {SPLITS}")
    data.check_split_access(split, f"{folder}: the reference features")
    refs = {}
    for s in read_spaces(folder):
        saved = torch.load(Path(folder) / s["reference"], map_location=device, weights_only=True)
        refs[s["suffix"]] = Reference(
            saved[f"{split}_feats"],
            saved[f"{split}_probs"],
            saved["train_feats"],
            saved["train_probs"],
            saved["evaluator_hash"],
            split,
        )
    return refs


@torch.no_grad()
def draw(model: GenerativeModel, n: int, generator: torch.Generator, batch_size: int, labels: torch.Tensor | None = None):
    """n samples of `model`: the noise (and a conditional model's label mix, balanced over all n) drawn at once from a
    CPU generator, then decoded in batches of `batch_size`, so neither the batch size nor the device changes the draw."""
    z = model.sample_latent(n, generator)
    if model.conditional and labels is None:
        labels = torch.arange(n, device=model.device) % 10  # the label-balanced mix of base.balanced_labels, over all n
    chunks = range(0, n, batch_size)
    if labels is None:
        return torch.cat([model.decode_draws(z[i : i + batch_size]) for i in chunks])
    return torch.cat([model.decode_draws(z[i : i + batch_size], labels[i : i + batch_size]) for i in chunks])


def with_band(out: dict, key: str, value: float | torch.Tensor, replicates, p: EvaluateParams) -> None:
    out[key] = float(value)
    out[f"{key}_lo"], out[f"{key}_hi"] = metrics.band(float(value), replicates, p.bootstrap_level)


def distances(feats, ref: Reference, p: EvaluateParams, suffix: str = "") -> dict[str, float]:
    """FID_cls, KID_cls, precision and recall of one embedded image set in one feature space, each
    with its bootstrap band: the generated features are resampled (counts over them) and the
    metric recomputed from them, the reference fixed; recall's band resamples the real points it
    scores (the generated manifold as computed, since duplicates would shrink k-NN radii)."""
    counts = metrics.bootstrap_counts(len(feats), p.bootstrap, p.bootstrap_seed)
    real_counts = metrics.bootstrap_counts(len(ref.feats), p.bootstrap, p.bootstrap_seed + 1)
    out: dict[str, float] = {}
    fid = metrics.fid_from_stats(*metrics.gaussian_stats(feats), *ref.stats)
    with_band(out, f"fid_cls{suffix}", fid, metrics.fid_replicates(feats, *ref.stats, counts), p)
    kid = metrics.kid_with_replicates(feats, ref.feats, p.kid_subsets, p.kid_subset_size, p.seed, counts)
    with_band(out, f"kid_cls{suffix}", kid["mean"], kid["replicates"], p)
    out[f"kid_cls{suffix}_std"] = kid["std"]
    fake_inside, real_inside = metrics.inside_flags(ref.feats, feats, p.pr_k)
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
    """The floor: a training subset scored against the split's images as if it were a model's samples, in every space."""
    row, _ = sample_quality({s: (r.train_feats, r.train_probs) for s, r in refs.items()}, refs, p)
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
    """Evaluate one trained model on one split at a time: `run(refs, x, y)` returns that split's metrics and writes
    its figures into `out` (when given). The samples are drawn and embedded once and shared by both splits."""

    def __init__(self, model: GenerativeModel, classifiers: dict[str, Classifier], p: EvaluateParams):
        """`classifiers` maps each feature space's suffix (SPACES) to its evaluator."""
        if "" not in classifiers:
            raise ValueError(f"the first feature space's evaluator is needed, got {sorted(classifiers)}")
        # The device's faster conv layout, as in training: 1.3x on the IWAE bound's decoder passes on a 2-core CPU
        self.model, self.p = model.eval().to(memory_format=memory_format(model.device)), p
        self.out: Path | None = None
        self.classifiers = {k: c.eval() for k, c in classifiers.items()}
        self.refs: dict[str, Reference] = {}
        self.device = model.device
        self.metrics: dict[str, float] = {}
        self.evidence: dict[str, object] = {}  # per sample and per image values: what a paired comparison resamples
        self.timings: dict[str, float] = {}
        self._samples: tuple[torch.Tensor, dict] | None = None
        self._conditional: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._paths: dict[str, tuple[torch.Tensor, dict]] = {}  # interpolation images and their features, by path

    def figure(self, name: str) -> Path | None:
        return None if self.out is None else self.out / name

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded with evaluate.seed + offset: every draw of the evaluation is made on the CPU and moved."""
        return torch.Generator().manual_seed(self.p.seed + offset)

    def timed(self, name, fn, *args):
        started = time.perf_counter()
        result = fn(*args)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started
        return result

    def embed(self, images) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{suffix: (features, probabilities)} of images in every feature space."""
        return {s: c.features_and_probs(images, self.p.batch_size) for s, c in self.classifiers.items()}

    @torch.no_grad()
    def samples(self) -> tuple[torch.Tensor, dict]:
        """`num_samples` prior samples drawn with evaluate.seed (the same noise for every model of a latent size), embedded."""
        if self._samples is None:
            images = draw(self.model, self.p.num_samples, self.generator(), self.p.batch_size)
            self._samples = images, self.embed(images)
        return self._samples

    @torch.no_grad()
    def prior_samples(self) -> None:
        images, embedded = self.samples()
        quality, histogram = sample_quality(embedded, self.refs, self.p)
        self.metrics.update(quality)
        self.metrics.update(metrics.sharpness(images, self.p.batch_size))
        self.evidence["sample_feats"] = {suffix: feats for suffix, (feats, _) in embedded.items()}
        if (path := self.figure("samples.png")) is not None:
            figures.save_grid(images[:100], path, nrow=10)
            figures.class_histogram(
                histogram, path.with_name("class_histogram.png"), f"{self.model.family}: predicted classes of samples"
            )

    @torch.no_grad()
    def reconstruction(self, x: torch.Tensor) -> None:
        """Per-pixel MSE and BCE over the whole split (the VAE decodes its posterior mean)."""
        se = bce = 0.0
        for i in range(0, len(x), self.p.batch_size):
            batch = x[i : i + self.p.batch_size]
            recon = self.model.decode(self.model.encode(batch)).clamp(1e-6, 1 - 1e-6)
            se += (recon - batch).square().sum().item()
            bce += torch.nn.functional.binary_cross_entropy(recon, batch, reduction="sum").item()
        pixels = x.numel()
        self.metrics.update({"recon_mse": se / pixels, "recon_bce": bce / pixels})
        if (path := self.figure("reconstructions.png")) is not None:
            first = x[:16]
            figures.save_grid(torch.cat([first, self.model.decode(self.model.encode(first))]), path, nrow=16)

    @torch.no_grad()
    def latent_scatter(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The codes of (up to) 5,000 of the split's digits: a scatter coloured by digit (with the learned class means,
        where the model has them), and how well they cluster by digit (silhouette, Euclidean, on the codes
        themselves, the same computation for every model with an encoder)."""
        n = min(5000, len(x))
        codes = torch.cat([self.model.encode(x[i : min(i + self.p.batch_size, n)]) for i in range(0, n, self.p.batch_size)])
        if (path := self.figure("latent_scatter.png")) is not None:
            means = self.model.class_latent_means()
            figures.latent_scatter(codes, y[:n], path, f"{self.model.family} latent codes of test digits", means=means)
        silhouette = metrics.silhouette(codes.cpu(), y[:n].cpu())
        self.metrics["latent_silhouette"] = silhouette.mean().item()
        self.metrics["latent_silhouette_stderr"] = (silhouette.std() / math.sqrt(len(silhouette))).item()

    @torch.no_grad()
    def conditional_draws(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`per_class_samples` samples asked for each digit, and their first-space features and probabilities (drawn once)."""
        if self._conditional is None:
            labels = torch.arange(10, device=self.device).repeat_interleave(self.p.per_class_samples)
            images = draw(self.model, len(labels), self.generator(3), self.p.batch_size, labels)
            feats, probs = self.embed(images)[""]
            self._conditional = images, labels, feats, probs
        return self._conditional

    @torch.no_grad()
    def conditional_samples(self, y: torch.Tensor) -> None:
        """Conditional models: label fidelity (the first evaluator's accuracy on samples asked for each digit)
        and FID_cls of each digit's samples against that digit's images of the split; figures."""
        p = self.p
        images, labels, feats, probs = self.conditional_draws()
        ref = self.refs[""]
        # The reference features are those of the first len(feats) images of the split (reference stage), so these are their labels.
        ref_y = y[: len(ref.feats)].to(ref.feats.device)
        fidelity = metrics.label_fidelity(probs, labels)
        self.metrics["label_fidelity"] = fidelity
        self.metrics["label_fidelity_stderr"] = math.sqrt(fidelity * (1 - fidelity) / len(labels))
        per_class = []
        for digit in range(10):
            mine = labels == digit
            per_class.append(metrics.fid(feats[mine], ref.feats[ref_y == digit]))
            self.metrics[f"fid_cls_digit_{digit}"] = per_class[-1]
            self.metrics[f"label_fidelity_digit_{digit}"] = metrics.label_fidelity(probs[mine], labels[mine])
        self.metrics["fid_cls_per_class_mean"] = sum(per_class) / len(per_class)
        if (path := self.figure("samples_by_class.png")) is not None:
            by_class = images.view(10, p.per_class_samples, 1, 28, 28)[:, :12]  # one row per digit
            figures.save_grid(by_class.flatten(0, 1), path, nrow=by_class.shape[1])
            # One row per noise vector, one column per digit: the same z (style) across a row.
            eps = self.model.sample_latent(8, self.generator(4))
            grid = torch.stack([self.model.decode_noise(eps, torch.full((8,), d, device=self.device)) for d in range(10)], dim=1)
            figures.save_grid(grid.flatten(0, 1), path.with_name("digit_grid.png"), nrow=10)

    @torch.no_grad()
    def interpolation(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Fixed pairs, `interp_steps` points each; confidence and FID_cls of the interior points in each space.

        Every family scores the same count of interior points (interp_pairs x (interp_steps - 2)); an AE
        or VAE encodes seeded pairs of the split's digits (endpoints are not scored). The points of one path
        are correlated, so the FID band resamples whole paths. These FIDs compare interpolations between
        models; they are not on FID_cls's scale (fewer, correlated points).
        """
        p = self.p
        t = torch.linspace(0, 1, p.interp_steps, device=self.device)
        if self.model.has_encoder:  # encode fixed pairs of different digits
            first, second = interpolation_pairs(y.cpu(), p.interp_pairs, torch.Generator().manual_seed(p.seed))
            z_a, z_b = self.model.encode(x[first.to(self.device)]), self.model.encode(x[second.to(self.device)])
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
            key = f"interpolation_{name}"
            if key not in self._paths or self.model.has_encoder:  # a noise model's paths are the same on every split
                z = path(z_a, z_b, t)  # [pairs, steps, latent]
                images = decode(z.flatten(0, 1)).view(len(z_a), p.interp_steps, 1, 28, 28)
                self._paths[key] = images, self.embed(images[:, 1:-1].flatten(0, 1))
            images, embedded = self._paths[key]
            for suffix, (feats, _) in embedded.items():
                stats = self.refs[suffix].stats
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
            if (figure := self.figure(f"interpolation_{name}.png")) is not None:
                figures.save_grid(images[:10].flatten(0, 1), figure, nrow=p.interp_steps)
        self.metrics["interp_points"] = float(len(z_a) * interior_steps)

    def likelihood(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """VAE families: the -ELBO and the IWAE bound (mnistgen.likelihood); the bounds given the label on test only."""
        given_label = self.model.conditional and self.refs[""].split == "test"  # a report row; choices use the marginal bound
        measured, evidence = likelihood.bounds(
            cast("VAE", self.model), x, y, self.p, self.generator(5), self.generator(6), given_label
        )
        self.metrics.update(measured)
        self.evidence.update(evidence)

    def prepare(self, refs: dict[str, Reference], out: Path | None = None) -> None:
        """Measure against `refs` (one split's references) from now on, figures into `out`, with fresh metrics."""
        if set(self.classifiers) != set(refs):
            raise ValueError(f"one reference per classifier: {sorted(self.classifiers)} vs {sorted(refs)}")
        self.refs, self.metrics, self.evidence, self.out = refs, {}, {}, None if out is None else Path(out)
        self.timings = {}
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)

    def run(self, refs: dict[str, Reference], x: torch.Tensor, y: torch.Tensor, out: Path | None = None) -> dict[str, float]:
        """Every metric of one split: `refs` are its reference features, x and y its images and labels; figures into `out`."""
        self.prepare(refs, out)
        self.timed("samples", self.prior_samples)
        if self.model.conditional:
            self.timed("conditional", self.conditional_samples, y)
        self.timed("interpolation", self.interpolation, x, y)
        if self.model.has_encoder:
            self.timed("reconstruction", self.reconstruction, x)
            self.timed("latent_scatter", self.latent_scatter, x, y)
        if hasattr(self.model, "iwae_nll"):
            self.timed("likelihood", self.likelihood, x, y)
        return self.metrics


def protocol_of(p: EvaluateParams, refs: dict[str, Reference], data_hash: str, device, family: type) -> dict:
    """The protocol (mnistgen.protocol) of measuring a `family` model against `refs` (one split's references)."""
    split = next(iter(refs.values())).split
    hashes = {suffix: ref.evaluator_hash for suffix, ref in refs.items()}
    return protocol.describe(p, split, data_hash, hashes, device, family, (sys.modules[__name__], likelihood))


def todays_protocol(p: EvaluateParams, evaluator: Path, prepared: Path, family: type, device) -> dict:
    """The validation protocol a `family` model would be measured under here and now: today's code, params,
    evaluators, data, device and torch."""
    refs = load_references(evaluator, "val")
    return protocol_of(p, refs, data.split_hashes(prepared)["val"], device, family)


def load_classifiers(folder: Path, device) -> dict[str, Classifier]:
    try:
        return evaluators.load_classifiers(folder, device)
    except (OSError, RuntimeError, KeyError, json.JSONDecodeError) as err:
        raise StageError(f"{folder}: cannot load the evaluators ({err}); run `dvc repro reference`") from err


def measure(
    model: GenerativeModel,
    evaluator: Path,
    prepared: Path,
    p: EvaluateParams,
    device,
    figures_dir: Path | None = None,
    splits: tuple[str, ...] = SPLITS,
    timings: dict[str, float] | None = None,
) -> tuple[dict[str, dict], dict]:
    """{split: metrics} of `model`, each carrying its protocol's fingerprint, and the validation split's evidence
    (its protocol and per-sample, per-image values). The one evaluation path: the evaluate stage, and promotion
    when it re-measures a champion under the candidate's protocol. Figures of the test split go to `figures_dir`;
    the seconds of each part, "<split>_<part>", into `timings` (kept out of the metrics, which are reproducible)."""
    torch.manual_seed(p.seed)
    job = Evaluation(model, load_classifiers(evaluator, device), p)
    hashes = data.split_hashes(prepared)
    results: dict[str, dict] = {}
    evidence: dict = {}
    for split in splits:
        refs = load_references(evaluator, split, device)
        part = data.load_split(prepared, split)
        x, y = data.to_float(part.images, device), part.labels.to(device)
        measured: dict = dict(job.run(refs, x, y, figures_dir if split == "test" else None))
        if timings is not None:
            timings.update({f"{split}_{part}": seconds for part, seconds in job.timings.items()})
        terms = protocol_of(p, refs, hashes[split], device, type(model))
        measured.update({f"evaluator_hash{suffix}": ref.evaluator_hash for suffix, ref in refs.items()})
        measured.update({"protocol": protocol.fingerprint(terms), "split": split})
        results[split] = measured
        if split == "val":
            evidence = {"protocol": terms, "fingerprint": measured["protocol"], **job.evidence}
    return results, evidence
