"""The comparison report: one table for every model plus the real-data column, the design's
claims checked against the numbers, and the figures (markdown + a static HTML page)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import pandas as pd
from scipy.stats import kendalltau

from .card import cell, fmt
from .evaluators import SPACES

DISTANCES = ["fid_cls", "kid_cls", "precision", "recall"]  # measured in both feature spaces, each with a band

# (metric, label, True when higher is better; None when closer to real data is better)
COLUMNS = [
    ("fid_cls", "FID_cls", False),
    ("fid_cls_e2", "FID_cls, evaluator 2", False),
    ("kid_cls", "KID_cls", False),
    ("kid_cls_e2", "KID_cls, evaluator 2", False),
    ("is_cls", "IS_cls", True),
    ("precision", "precision", True),
    ("precision_e2", "precision, evaluator 2", True),
    ("recall", "recall", True),
    ("recall_e2", "recall, evaluator 2", True),
    ("classes_present", "digits present", True),
    ("class_tv_to_uniform", "TV to uniform", False),
    ("grad_mag", "sharpness: gradient magnitude", None),
    ("laplacian_var", "sharpness: Laplacian variance", None),
    ("grey_fraction", "grey pixels (0.1 < p < 0.9)", None),
    ("interp_linear_confidence", "interp. confidence (linear)", True),
    ("interp_linear_midpoint_confidence", "midpoint confidence (linear)", True),
    ("interp_linear_midpoint_confidence_e2", "midpoint confidence (linear), evaluator 2", True),
    ("interp_linear_fid_cls", "interp. FID_cls (linear)", False),
    ("interp_linear_fid_cls_e2", "interp. FID_cls (linear), evaluator 2", False),
    ("interp_slerp_confidence", "interp. confidence (slerp)", True),
    ("interp_slerp_fid_cls", "interp. FID_cls (slerp)", False),
    ("interp_slerp_fid_cls_e2", "interp. FID_cls (slerp), evaluator 2", False),
    ("recon_mse", "recon. MSE", False),
    ("recon_bce", "recon. BCE", False),
    ("nelbo_grey", "-ELBO grey (nats)", False),
    ("nelbo_binarized", "-ELBO binarised (nats)", False),
    ("iwae_nll", "IWAE bound on -log p(x) (nats)", False),
    # The CVAE's bounds given each image's digit: -log p(x | y), another quantity, in rows of their own.
    ("nelbo_grey_given_label", "-ELBO grey, given the digit (nats)", False),
    ("nelbo_binarized_given_label", "-ELBO binarised, given the digit (nats)", False),
    ("iwae_nll_given_label", "IWAE bound on -log p(x | y) (nats)", False),
    ("latent_silhouette", "latent silhouette by digit", True),
    ("label_fidelity", "label fidelity", True),
    ("fid_cls_per_class_mean", "per-class FID_cls (mean of 10)", False),
]
FIGURES = [
    "samples.png",
    "interpolation_linear.png",
    "interpolation_slerp.png",
    "reconstructions.png",
    "latent_scatter.png",
    "class_histogram.png",
    "digit_grid.png",
    "samples_by_class.png",
]
FIDELITY_BAR = 0.9  # "keeps the requested digit": at least 9 samples in 10 are read as the digit asked for


def winners(results: dict[str, dict]) -> dict[str, str]:
    """For each metric with a better direction, the one model with the best value (real data excluded; none on a tie)."""
    out = {}
    for key, _, higher in COLUMNS:
        scored = {m: r[key] for m, r in results.items() if key in r}
        if len(scored) > 1 and higher is not None:
            best = (max if higher else min)(scored.values())
            leaders = [m for m, v in scored.items() if v == best]
            if len(leaders) == 1:  # a tie (ten digits present in every model's samples) has no winner
                out[key] = leaders[0]
    return out


def rank_agreement(results: dict[str, dict]) -> dict[str, float]:
    """Kendall tau between the two feature spaces' rankings of the models, per distance metric."""
    out = {}
    for key in DISTANCES:
        models = [m for m, r in results.items() if key in r and f"{key}_e2" in r]
        if len(models) >= 2:
            out[key] = float(kendalltau([results[m][key] for m in models], [results[m][f"{key}_e2"] for m in models]).statistic)
    return out


HOLDS, FAILS, TOO_CLOSE = "holds", "does not hold", "too close to call"
VERDICT_CLASS = {HOLDS: "ok", FAILS: "no", TOO_CLOSE: "close"}


def verdict(holds: bool) -> str:
    return HOLDS if holds else FAILS


def combine(verdicts) -> str:
    """One verdict from several checks that must all hold: any failure fails, then any too-close is too close."""
    verdicts = list(verdicts)
    if FAILS in verdicts:
        return FAILS
    return TOO_CLOSE if TOO_CLOSE in verdicts else HOLDS


def by_band(a: dict, b: dict, key: str, a_larger: bool) -> str | None:
    """Does a's `key` exceed b's (a_larger) or fall below it? Too close to call when the two bands overlap
    (or, without bands, when the gap is within two combined standard errors). None if either lacks the metric."""
    if key not in a or key not in b:
        return None
    x, y = a[key], b[key]
    if f"{key}_lo" in a and f"{key}_lo" in b:
        overlap = a[f"{key}_lo"] <= b[f"{key}_hi"] and b[f"{key}_lo"] <= a[f"{key}_hi"]
    else:
        overlap = abs(x - y) <= 2 * math.hypot(a.get(f"{key}_stderr", 0.0), b.get(f"{key}_stderr", 0.0))
    if overlap:
        return TOO_CLOSE
    return verdict(x > y if a_larger else x < y)


def in_both_spaces(a: dict, b: dict, key: str, a_larger: bool) -> tuple[str, str] | None:
    """The verdict over both feature spaces (it holds only if it holds in each) and a sentence saying so."""
    per_space = {name: v for suffix, name in SPACES.items() if (v := by_band(a, b, key + suffix, a_larger)) is not None}
    if not per_space:
        return None
    outcome = combine(per_space.values())
    if len(per_space) == 1:
        return outcome, f"{next(iter(per_space.values()))} in {next(iter(per_space))}'s space only (no second space measured)"
    values = set(per_space.values())
    if values == {HOLDS}:
        return outcome, "holds in both feature spaces"
    return outcome, "; ".join(f"{name}: {v}" for name, v in per_space.items())


def _pair(a: dict, b: dict, key: str, name_a: str, name_b: str) -> str:
    parts = []
    for suffix, space in SPACES.items():
        if key + suffix in a and key + suffix in b:
            parts.append(f"{space} {name_a} {cell(a, key + suffix)} vs {name_b} {cell(b, key + suffix)}")
    return "; ".join(parts)


def wasserstein_falls(w: list[float], margin: float = 0.1) -> bool:
    """The critic's W estimate falls: the last epoch is below the first by more than `margin` of the first's size,
    and the least-squares slope over the epochs is negative."""
    if len(w) < 2:
        return False
    n = len(w)
    mean_x, mean_w = (n - 1) / 2, sum(w) / n
    slope = sum((i - mean_x) * (v - mean_w) for i, v in enumerate(w)) / sum((i - mean_x) ** 2 for i in range(n))
    return w[-1] < w[0] - margin * abs(w[0]) and slope < 0


def conditional_claims(results: dict[str, dict]) -> list[tuple[str, str, str]]:
    """The story's conditioning step: the CVAE's codes cluster by digit, and conditional samples keep their digit."""
    out = []
    vae, cvae = results.get("vae", {}), results.get("cvae", {})
    key = "latent_silhouette"
    if key in vae and key in cvae:  # by_band has a verdict: both have the metric
        out.append(
            (
                "The CVAE's latent codes cluster by digit more than the VAE's",
                by_band(cvae, vae, key, a_larger=True) or TOO_CLOSE,
                f"silhouette of test codes by their label CVAE {fmt(cvae[key])} vs VAE {fmt(vae[key])} "
                f"(standard errors {fmt(cvae.get(key + '_stderr', 0.0))} and {fmt(vae.get(key + '_stderr', 0.0))} over the codes)",
            )
        )
    conditional = {m: r for m, r in results.items() if "label_fidelity" in r}
    if conditional:
        bar = {"label_fidelity": FIDELITY_BAR}
        outcome = combine(by_band(r, bar, "label_fidelity", a_larger=True) for r in conditional.values())
        mix = [
            f"{m.upper()} {fmt(r['class_tv_to_uniform'])}"
            for m, r in results.items()
            if m not in conditional and "class_tv_to_uniform" in r
        ]
        out.append(
            (
                f"Conditional samples keep their requested digit (label fidelity above {FIDELITY_BAR}), while an unconditional "
                "model's class mix is what it is",
                outcome,
                "label fidelity "
                + ", ".join(f"{m.upper()} {fmt(r['label_fidelity'])}" for m, r in conditional.items())
                + " (the evaluator's accuracy on samples asked for each digit, first feature space); an unconditional model "
                "asked for a digit gives it only at that digit's share of its samples, about 0.1"
                + (f" (class mix TV to uniform {', '.join(mix)})" if mix else ""),
            )
        )
    return out


def claims(results: dict[str, dict], curves: dict[str, dict[str, list[float]]]) -> list[tuple[str, str, str]]:
    """The design's story as checks on the measured numbers: (claim, verdict, evidence).

    A distance claim is checked in both evaluator feature spaces; in each, overlapping bootstrap
    bands make it "too close to call", and it holds only if it holds in both (the evidence says
    which). Where a metric has a standard error instead, a gap within two combined standard errors
    is too close to call.
    """
    ae, vae = results.get("ae", {}), results.get("vae", {})
    out = []
    if (both := in_both_spaces(ae, vae, "fid_cls", a_larger=True)) is not None:
        out.append(
            (
                "AE prior samples (Gaussian fitted to its codes) are worse than VAE prior samples",
                both[0],
                f"FID_cls {_pair(ae, vae, 'fid_cls', 'AE', 'VAE')}; {both[1]}",
            )
        )
    key = "interp_linear_midpoint_confidence"
    if (both := in_both_spaces(ae, vae, key, a_larger=False)) is not None:
        out.append(
            (
                "AE interpolation midpoints are less recognisable than VAE midpoints",
                both[0],
                f"evaluator confidence at the midpoint (standard error over the pairs) {_pair(ae, vae, key, 'AE', 'VAE')}; {both[1]}",
            )
        )
    key = "interp_linear_fid_cls"
    if (both := in_both_spaces(ae, vae, key, a_larger=True)) is not None:
        out.append(
            (
                "AE interpolation paths leave the data manifold more than VAE paths",
                both[0],
                f"FID_cls of interior points (same count per model, paths from held-out digits) {_pair(ae, vae, key, 'AE', 'VAE')}; {both[1]}",
            )
        )
    gans = [m for m in ("gan", "wgan") if "grad_mag" in results.get(m, {})]
    if "grad_mag" in vae and gans:
        checks, evidence = [], []
        for m in gans:
            g = results[m]
            checks += [
                by_band(g, vae, "grad_mag", True),
                by_band(g, vae, "laplacian_var", True),
                by_band(g, vae, "grey_fraction", False),
            ]
            evidence.append(
                f"{m.upper()} gradient magnitude {cell(g, 'grad_mag')}, Laplacian variance {cell(g, 'laplacian_var')}, "
                f"grey pixels {cell(g, 'grey_fraction')}"
            )
        evidence.append(f"VAE {cell(vae, 'grad_mag')}, {cell(vae, 'laplacian_var')}, {cell(vae, 'grey_fraction')}")
        out.append(
            (
                "A GAN's learned distance gives sharper samples than the VAE's pixel likelihood (every GAN: larger "
                "gradients and Laplacian variance, fewer grey pixels)",
                combine(checks),
                "; ".join(evidence) + "; a pixel measure, the same in both feature spaces",
            )
        )
    gans = [m for m in ("gan", "wgan") if "fid_cls" in results.get(m, {})]
    if "fid_cls" in vae and gans:
        best = min(gans, key=lambda m: results[m]["fid_cls"])
        both = in_both_spaces(vae, results[best], "fid_cls", a_larger=True) or (TOO_CLOSE, "not measured")
        out.append(
            (
                "A GAN's samples are closer to the data than the VAE's",
                both[0],
                f"FID_cls {_pair(results[best], vae, 'fid_cls', best.upper(), 'VAE')}; {both[1]}",
            )
        )
    wgan_curve = curves.get("wgan", {})
    if wgan_curve.get("grad_norm") and wgan_curve.get("wasserstein"):
        norms, w = wgan_curve["grad_norm"], wgan_curve["wasserstein"]
        stable = all(0.5 < n < 2.0 for n in norms) and wasserstein_falls(w)
        out.append(
            (
                "The WGAN-GP trains stably: its critic stays near 1-Lipschitz and its Wasserstein estimate falls",
                verdict(stable),
                f"mean critic gradient norm per epoch {', '.join(f'{n:.2f}' for n in norms)}; "
                f"critic estimate of W first {w[0]:.2f}, last {w[-1]:.2f} (must fall by more than 10 % with a negative slope); "
                "training curves, no feature space",
            )
        )
    return out + conditional_claims(results)


def table(results: dict[str, dict], real: dict, bold=lambda cell: f"**{cell}**") -> pd.DataFrame:
    """Metrics as rows (each with its band where it has one), models and the real-data floor as columns;
    the best model per row marked by `bold`."""
    best = winners(results)
    rows = {}
    for key, label, higher in COLUMNS:
        if any(key in r for r in results.values()):
            cells = {m.upper(): bold(cell(r, key)) if best.get(key) == m else cell(r, key) for m, r in results.items()}
            arrow = "≈ real" if higher is None else ("↑" if higher else "↓")
            rows[f"{label} {arrow}"] = {**cells, "real data": cell(real, key)}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("metric")


HEADLINE = ["fid_cls", "fid_cls_e2", "precision", "recall", "is_cls", "recon_mse", "iwae_nll", "label_fidelity"]


def with_seed_spread(results: dict[str, dict], seeds: dict[str, dict], split: str = "test") -> dict[str, dict]:
    """The results with each metric's standard deviation over training seeds (metrics/seeds/<model>.json, `mnistgen
    seeds`) as `<key>_seed_sd` and the number of seeds as `seeds`, where a model has a seeds file measured under the
    results' own protocol (a smoke run's figures never get the default run's spread)."""
    out = {}
    for name, r in results.items():
        measured_alike = seeds.get(name, {}).get("protocols", {}).get(split) == r.get("protocol")
        spread = seeds[name]["spread"][split] if measured_alike else {}
        out[name] = {**r, **{f"{k}_seed_sd": v["sd"] for k, v in spread.items()}}
        if spread:
            out[name]["seeds"] = len(seeds[name]["seeds"])
    return out


def headline_table(results: dict[str, dict]) -> str:
    """The README's table: one row per model, the headline metrics with their bands (markdown)."""
    labels = {key: label for key, label, _ in COLUMNS}
    header = "| model | " + " | ".join(labels[k] for k in HEADLINE) + " |"
    rule = "| --- " * (len(HEADLINE) + 1) + "|"
    rows = [f"| {name.upper()} | " + " | ".join(cell(r, k) for k in HEADLINE) + " |" for name, r in results.items()]
    return "\n".join([header, rule, *rows])


def notes(results: dict[str, dict], evaluator: dict, agreement: dict[str, float]) -> list[str]:
    """What the table's numbers are: the spaces, the bands, the likelihood images, the interpolation counts, rank agreement."""
    lines = [
        f"Feature spaces: evaluator 1 (test accuracy {evaluator.get('test_accuracy', 0):.4f}, checkpoint sha256 "
        f"`{str(evaluator.get('evaluator_hash', '?'))[:16]}…`) and evaluator 2, another architecture and seed (test accuracy "
        f"{evaluator.get('test_accuracy_e2', 0):.4f}, sha256 `{str(evaluator.get('evaluator_hash_e2', '?'))[:16]}…`).",
        "Bands [lo, hi]: bootstrap percentile intervals over the already-computed features (the generated set resampled, "
        "the test reference fixed; recall resamples the real points it scores), centred on the estimate. "
        "A gap whose bands overlap is too close to call. ± is a standard error.",
        "Sharpness is measured on the prior samples and, in the real-data column, on the reference test digits.",
    ]
    counts = sorted({int(r["seeds"]) for r in results.values() if "seeds" in r})
    if counts:
        lines.append(
            f"sd: the standard deviation of a figure over {' or '.join(map(str, counts))} training seeds of the default run "
            "(metrics/seeds/, `mnistgen seeds`): the training noise, which the bands above do not include. Another CPU "
            "gives other floats; its figures fall within this spread, not on these digits."
        )
    vae = results.get("vae", results.get("cvae", {}))
    if "likelihood_images" in vae:
        which = "all" if vae.get("likelihood_all_images") else "a seeded random subset of"
        lines.append(
            f"The -ELBO (grey and binarised) and IWAE bounds (k = {vae.get('iwae_k', 0):.0f}) are all on the same "
            f"{vae['likelihood_images']:.0f} test images ({which} the test set), binarised once with evaluate.binarize_seed. "
            "The IWAE row bounds -log p(x) for the VAE and the CVAE alike (the CVAE's marginalises the digit over its "
            "ten class priors); the CVAE's bounds given each image's digit bound -log p(x | y) and have rows of their own."
        )
    points = {r["interp_points"] for r in results.values() if "interp_points" in r}
    if points:
        lines.append(
            f"Interpolation FID_cls: {', '.join(f'{p:.0f}' for p in sorted(points))} interior points per model, "
            "AE/VAE paths between seeded pairs of test digits, bands resampling whole paths; it compares "
            "interpolations between models and is not on FID_cls's scale (fewer, correlated points)."
        )
    if agreement:
        lines.append(
            "Rank agreement of the two feature spaces over the models (Kendall tau, 1 = same order, -1 = reversed): "
            + ", ".join(f"{k} {v:+.2f}" for k, v in agreement.items())
            + "."
        )
    return lines


def build_markdown(results: dict[str, dict], real: dict, evaluator: dict, checks) -> str:
    agreement = rank_agreement(results)
    lines = [
        f"# {' → '.join(m.upper() for m in results)} on MNIST: comparison",
        "",
        "Sample metrics score each model's prior samples against the test images; the real-data column scores "
        "training images the same way (the floor). Best model per metric in bold.",
        "",
        *(f"- {line}" for line in notes(results, evaluator, agreement)),
        "",
        table(results, real).to_markdown(),
        "",
    ]
    conditional = [m.upper() for m, r in results.items() if "label_fidelity" in r]
    if conditional:
        lines += [
            f"Conditional models ({', '.join(conditional)}): their sample metrics above are those of a label-balanced mix "
            "(each digit in equal numbers); label fidelity is the evaluator's accuracy on samples asked for each digit, and "
            "per-class FID_cls the mean over the ten digits of FID_cls of that digit's samples against that digit's test images. "
            "The CVAE's -ELBO and IWAE NLL are conditional on the label: they bound -log p(x | y), not the VAE's -log p(x) "
            "(with ten equally likely digits, -log p(x) <= -log p(x | y) + log 10 = + 2.30 nats).",
            "",
        ]
    lines += ["## What the numbers say", ""]
    for claim, outcome, evidence in checks:
        lines.append(f"- **{outcome}**: {claim}: {evidence}.")
    best = winners(results)
    lines += ["", "## Who wins what", ""]
    for key, label, _ in COLUMNS:
        if key in best:
            lines.append(f"- {label}: {best[key].upper()}")
    return "\n".join(lines) + "\n"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}"><figcaption>{html.escape(path.parent.name + "/" + path.name)}</figcaption></figure>'


def build_html(results: dict, real: dict, checks, figures: dict[str, list[Path]], evaluator: dict | None = None) -> str:
    """The page: the notes, the table, the claims, and each model's figures (`figures[model]`, PNGs embedded)."""
    note_items = "".join(f"<li>{html.escape(line)}</li>" for line in notes(results, evaluator or {}, rank_agreement(results)))
    comparison = table(results, real, bold=lambda cell: f"<b>{cell}</b>").to_html(escape=False, table_id="comparison", border=0)
    claim_items = "".join(
        f"<li><b class='{VERDICT_CLASS[v]}'>{v}</b>: {html.escape(c)}: {html.escape(e)}.</li>" for c, v, e in checks
    )
    sections = "".join(
        f"<h2>{model.upper()}</h2><div class='figs'>{''.join(_img(f) for f in paths)}</div>" for model, paths in figures.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MNIST generative models: comparison</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} th{{text-align:left}} td b{{color:#1b5e20}}
.ok{{color:#1b5e20}} .no{{color:#b71c1c}} .close{{color:#8a6d00}} .figs{{display:flex;flex-wrap:wrap;gap:12px}} figure{{margin:0}} img{{max-width:420px;image-rendering:pixelated}} figcaption{{font-size:12px;color:#555}}</style>
</head><body><h1>{" → ".join(m.upper() for m in results)} on MNIST</h1>
<ul id="notes">{note_items}</ul>
{comparison}
<h2>What the numbers say</h2><ul id="claims">{claim_items}</ul>{sections}</body></html>
"""


RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"


def with_results_table(page: str, table: str, where: str = "README.md") -> str:
    """`page` with the text between its results markers replaced by `table`."""
    start, end = page.find(RESULTS_START), page.find(RESULTS_END)
    if start < 0 or end < start:
        raise ValueError(f"{where}: no results table between {RESULTS_START} and {RESULTS_END}")
    return page[: start + len(RESULTS_START)] + "\n" + table.strip() + "\n" + page[end:]
