"""The comparison report: one table for every model plus the real-data column, the design's
claims checked against the numbers, and the figures (markdown + a static HTML page)."""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import pandas as pd

# (metric, label, True when higher is better)
COLUMNS = [
    ("fid_cls", "FID_cls", False),
    ("kid_cls", "KID_cls", False),
    ("is_cls", "IS_cls", True),
    ("precision", "precision", True),
    ("recall", "recall", True),
    ("classes_present", "digits present", True),
    ("class_tv_to_uniform", "TV to uniform", False),
    ("interp_linear_confidence", "interp. confidence (linear)", True),
    ("interp_linear_midpoint_confidence", "midpoint confidence (linear)", True),
    ("interp_linear_fid_cls", "interp. FID_cls (linear)", False),
    ("interp_slerp_confidence", "interp. confidence (slerp)", True),
    ("interp_slerp_fid_cls", "interp. FID_cls (slerp)", False),
    ("recon_mse", "recon. MSE", False),
    ("recon_bce", "recon. BCE", False),
    ("nelbo_grey", "-ELBO grey (nats)", False),
    ("nelbo_binarized", "-ELBO binarised (nats)", False),
    ("iwae_nll", "IWAE NLL (nats)", False),
    ("latent_silhouette", "latent silhouette by digit", True),
    ("label_fidelity", "label fidelity", True),
    ("fid_cls_per_class_mean", "per-class FID_cls (mean of 10)", False),
]
FIGURES = ["samples.png", "interpolation_linear.png", "interpolation_slerp.png", "reconstructions.png",
           "latent_scatter.png", "class_histogram.png", "digit_grid.png", "samples_by_class.png"]
FIDELITY_BAR = 0.9  # "keeps the requested digit": at least 9 samples in 10 are read as the digit asked for


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def winners(results: dict[str, dict]) -> dict[str, str]:
    """For each metric, the model with the best value (real data excluded)."""
    out = {}
    for key, _, higher in COLUMNS:
        scored = {m: r[key] for m, r in results.items() if key in r}
        if len(scored) > 1:
            out[key] = (max if higher else min)(scored, key=scored.get)
    return out


HOLDS, FAILS, TOO_CLOSE = "holds", "does not hold", "too close to call"
VERDICT_CLASS = {HOLDS: "ok", FAILS: "no", TOO_CLOSE: "close"}


def verdict(holds: bool) -> str:
    return HOLDS if holds else FAILS


def compared(a: float, b: float, se_a: float, se_b: float) -> str:
    """HOLDS when a > b by more than two combined standard errors, TOO_CLOSE within them, else FAILS."""
    if abs(a - b) <= 2 * math.hypot(se_a, se_b):
        return TOO_CLOSE
    return verdict(a > b)


def conditional_claims(results: dict[str, dict]) -> list[tuple[str, str, str]]:
    """The story's conditioning step: the CVAE's codes cluster by digit, and conditional samples keep their digit."""
    out = []
    vae, cvae = results.get("vae", {}), results.get("cvae", {})
    key = "latent_silhouette"
    if key in vae and key in cvae:
        se_v, se_c = vae.get(f"{key}_stderr", 0.0), cvae.get(f"{key}_stderr", 0.0)
        out.append(("The CVAE's latent codes cluster by digit more than the VAE's",
                    compared(cvae[key], vae[key], se_c, se_v),
                    f"silhouette of test codes by their label CVAE {fmt(cvae[key])} vs VAE {fmt(vae[key])} "
                    f"(standard errors {fmt(se_c)} and {fmt(se_v)} over the codes)"))
    conditional = {m: r for m, r in results.items() if "label_fidelity" in r}
    if conditional:
        outcomes = [compared(r["label_fidelity"], FIDELITY_BAR, r.get("label_fidelity_stderr", 0.0), 0.0) for r in conditional.values()]
        outcome = FAILS if FAILS in outcomes else TOO_CLOSE if TOO_CLOSE in outcomes else HOLDS
        mix = [f"{m.upper()} {fmt(r['class_tv_to_uniform'])}" for m, r in results.items() if m not in conditional and "class_tv_to_uniform" in r]
        out.append((f"Conditional samples keep their requested digit (label fidelity above {FIDELITY_BAR}), while an unconditional "
                    "model's class mix is what it is", outcome,
                    "label fidelity " + ", ".join(f"{m.upper()} {fmt(r['label_fidelity'])}" for m, r in conditional.items())
                    + " (the evaluator's accuracy on samples asked for each digit); an unconditional model asked for a digit "
                    "gives it only at that digit's share of its samples, about 0.1"
                    + (f" (class mix TV to uniform {', '.join(mix)})" if mix else "")))
    return out


def claims(results: dict[str, dict], curves: dict[str, dict[str, list[float]]]) -> list[tuple[str, str, str]]:
    """The design's story as checks on the measured numbers: (claim, verdict, evidence).

    Where a metric comes with a standard error, a gap of at most two combined standard errors
    is "too close to call" rather than a win for either side.
    """
    ae, vae = results.get("ae", {}), results.get("vae", {})
    out = []
    if "fid_cls" in ae and "fid_cls" in vae:
        out.append(("AE prior samples (Gaussian fitted to its codes) are worse than VAE prior samples",
                    verdict(ae["fid_cls"] > vae["fid_cls"]), f"FID_cls AE {fmt(ae['fid_cls'])} vs VAE {fmt(vae['fid_cls'])}"))
    key = "interp_linear_midpoint_confidence"
    if key in ae and key in vae:
        a, v = ae[key], vae[key]
        se_a, se_v = ae.get(f"{key}_stderr", 0.0), vae.get(f"{key}_stderr", 0.0)
        evidence = f"evaluator confidence at the midpoint AE {fmt(a)} vs VAE {fmt(v)}"
        if se_a or se_v:
            evidence += f" (standard errors {fmt(se_a)} and {fmt(se_v)} over the pairs)"
        close = abs(a - v) <= 2 * math.hypot(se_a, se_v)
        out.append(("AE interpolation midpoints are less recognisable than VAE midpoints",
                    TOO_CLOSE if close else verdict(a < v), evidence))
    if "interp_linear_fid_cls" in ae and "interp_linear_fid_cls" in vae:
        a, v = ae["interp_linear_fid_cls"], vae["interp_linear_fid_cls"]
        out.append(("AE interpolation paths leave the data manifold more than VAE paths", verdict(a > v),
                    f"FID_cls of interior points AE {fmt(a)} vs VAE {fmt(v)}"))
    gans = [m for m in ("gan", "wgan") if "fid_cls" in results.get(m, {})]
    if "vae" in results and gans:
        best = min(gans, key=lambda m: results[m]["fid_cls"])
        out.append(("A GAN's learned distance gives sharper samples than the VAE's pixel likelihood",
                    verdict(results[best]["fid_cls"] < vae.get("fid_cls", float("inf"))),
                    f"FID_cls {best.upper()} {fmt(results[best]['fid_cls'])} vs VAE {fmt(vae.get('fid_cls'))}"))
    wgan_curve = curves.get("wgan", {})
    if wgan_curve.get("grad_norm") and wgan_curve.get("wasserstein"):
        norms, w = wgan_curve["grad_norm"], wgan_curve["wasserstein"]
        stable = bool(norms) and all(0.5 < n < 2.0 for n in norms) and w[-1] <= max(w)
        out.append(("The WGAN-GP trains stably: its critic stays near 1-Lipschitz and its Wasserstein estimate falls",
                    verdict(stable), f"mean critic gradient norm per epoch {', '.join(f'{n:.2f}' for n in norms)}; "
                    f"critic estimate of W first {w[0]:.2f}, last {w[-1]:.2f}"))
    return out + conditional_claims(results)


def table(results: dict[str, dict], real: dict, bold=lambda cell: f"**{cell}**") -> pd.DataFrame:
    """Metrics as rows, models and the real-data floor as columns; the best model per row marked by `bold`."""
    best = winners(results)
    rows = {}
    for key, label, higher in COLUMNS:
        if any(key in r for r in results.values()):
            cells = {m.upper(): bold(fmt(r.get(key))) if best.get(key) == m else fmt(r.get(key)) for m, r in results.items()}
            rows[f"{label} {'↑' if higher else '↓'}"] = {**cells, "real data": fmt(real.get(key))}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("metric")


def build_markdown(results: dict[str, dict], real: dict, evaluator: dict, checks) -> str:
    lines = [
        f"# {' → '.join(m.upper() for m in results)} on MNIST: comparison", "",
        f"Evaluator: test accuracy {evaluator.get('test_accuracy', 0):.4f}, checkpoint sha256 `{evaluator.get('evaluator_hash', '?')[:16]}…`. "
        "Sample metrics use 10,000 prior samples against the 10,000 test images in the evaluator's feature space; "
        "the real-data column scores 10,000 training images the same way (the floor). Best model per metric in bold.", "",
        table(results, real).to_markdown(), "",
    ]
    conditional = [m.upper() for m, r in results.items() if "label_fidelity" in r]
    if conditional:
        lines += [
            f"Conditional models ({', '.join(conditional)}): their sample metrics above are those of a label-balanced mix "
            "(each digit in equal numbers); label fidelity is the evaluator's accuracy on samples asked for each digit, and "
            "per-class FID_cls the mean over the ten digits of FID_cls of that digit's samples against that digit's test images. "
            "The CVAE's -ELBO and IWAE NLL are conditional on the label: they bound -log p(x | y), not the VAE's -log p(x) "
            "(with ten equally likely digits, -log p(x) <= -log p(x | y) + log 10 = + 2.30 nats).", "",
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


def build_html(results: dict, real: dict, checks, figures: dict[str, list[Path]]) -> str:
    """The page: the table, the claims, and each model's figures (`figures[model]`, PNGs embedded)."""
    comparison = table(results, real, bold=lambda cell: f"<b>{cell}</b>").to_html(escape=False, table_id="comparison", border=0)
    claim_items = "".join(
        f"<li><b class='{VERDICT_CLASS[v]}'>{v}</b>: {html.escape(c)}: {html.escape(e)}.</li>"
        for c, v, e in checks
    )
    sections = "".join(f"<h2>{model.upper()}</h2><div class='figs'>{''.join(_img(f) for f in paths)}</div>" for model, paths in figures.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MNIST generative models: comparison</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} th{{text-align:left}} td b{{color:#1b5e20}}
.ok{{color:#1b5e20}} .no{{color:#b71c1c}} .close{{color:#8a6d00}} .figs{{display:flex;flex-wrap:wrap;gap:12px}} figure{{margin:0}} img{{max-width:420px;image-rendering:pixelated}} figcaption{{font-size:12px;color:#555}}</style>
</head><body><h1>{' → '.join(m.upper() for m in results)} on MNIST</h1>
{comparison}
<h2>What the numbers say</h2><ul id="claims">{claim_items}</ul>{sections}</body></html>
"""
