"""The comparison report: one table for the four models plus the real-data row, the design's
claims checked against the numbers, and the figures (markdown + a static HTML page)."""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

MODELS = ("ae", "vae", "gan", "wgan")
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
]
FIGURES = ["samples.png", "interpolation_linear.png", "interpolation_slerp.png", "reconstructions.png",
           "latent_scatter.png", "class_histogram.png"]


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


def claims(results: dict[str, dict], curves: dict[str, list[dict]]) -> list[tuple[str, str, str]]:
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
    wgan_curve = curves.get("wgan", [])
    if wgan_curve:
        norms = [row["grad_norm"] for row in wgan_curve if "grad_norm" in row]
        w = [row["wasserstein"] for row in wgan_curve if "wasserstein" in row]
        stable = bool(norms) and all(0.5 < n < 2.0 for n in norms) and w[-1] <= max(w)
        out.append(("The WGAN-GP trains stably: its critic stays near 1-Lipschitz and its Wasserstein estimate falls",
                    verdict(stable), f"mean critic gradient norm per epoch {', '.join(f'{n:.2f}' for n in norms)}; "
                    f"critic estimate of W first {w[0]:.2f}, last {w[-1]:.2f}"))
    return out


def table_markdown(results: dict[str, dict], real: dict) -> str:
    present = [c for c in COLUMNS if any(c[0] in r for r in results.values())]
    best = winners(results)
    head = "| metric | " + " | ".join(m.upper() for m in results) + " | real data |"
    lines = [head, "|" + " --- |" * (len(results) + 2)]
    for key, label, higher in present:
        cells = []
        for model, r in results.items():
            cell = fmt(r.get(key))
            cells.append(f"**{cell}**" if best.get(key) == model else cell)
        arrow = "↑" if higher else "↓"
        lines.append(f"| {label} {arrow} | " + " | ".join(cells) + f" | {fmt(real.get(key))} |")
    return "\n".join(lines)


def build_markdown(results: dict[str, dict], real: dict, evaluator: dict, checks) -> str:
    lines = [
        "# AE → VAE → GAN → WGAN-GP on MNIST: comparison", "",
        f"Evaluator: test accuracy {evaluator.get('test_accuracy', 0):.4f}, checkpoint sha256 `{evaluator.get('evaluator_hash', '?')[:16]}…`. "
        "Sample metrics use 10,000 prior samples against the 10,000 test images in the evaluator's feature space; "
        "the real-data column scores 10,000 training images the same way (the floor). Best model per metric in bold.", "",
        table_markdown(results, real), "", "## What the numbers say", "",
    ]
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


def build_html(results: dict, real: dict, checks, reports: Path, curves_png: dict[str, Path]) -> str:
    best = winners(results)
    rows = []
    for key, label, higher in COLUMNS:
        if not any(key in r for r in results.values()):
            continue
        cells = "".join(
            f"<td class='{'best' if best.get(key) == m else ''}'>{fmt(r.get(key))}</td>" for m, r in results.items()
        )
        rows.append(f"<tr><th>{label} {'↑' if higher else '↓'}</th>{cells}<td>{fmt(real.get(key))}</td></tr>")
    header = "".join(f"<th>{m.upper()}</th>" for m in results)
    claim_items = "".join(
        f"<li><b class='{VERDICT_CLASS[v]}'>{v}</b>: {html.escape(c)}: {html.escape(e)}.</li>"
        for c, v, e in checks
    )
    sections = []
    for model in results:
        figs = [reports / model / f for f in FIGURES if (reports / model / f).exists()]
        if model in curves_png and curves_png[model].exists():
            figs.append(curves_png[model])
        sections.append(f"<h2>{model.upper()}</h2><div class='figs'>{''.join(_img(f) for f in figs)}</div>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MNIST generative models: comparison</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} th{{text-align:left}} td.best{{font-weight:bold;background:#e8f5e9}}
.ok{{color:#1b5e20}} .no{{color:#b71c1c}} .close{{color:#8a6d00}} .figs{{display:flex;flex-wrap:wrap;gap:12px}} figure{{margin:0}} img{{max-width:420px;image-rendering:pixelated}} figcaption{{font-size:12px;color:#555}}</style>
</head><body><h1>AE → VAE → GAN → WGAN-GP on MNIST</h1>
<table id="comparison"><tr><th>metric</th>{header}<th>real data</th></tr>{''.join(rows)}</table>
<h2>What the numbers say</h2><ul id="claims">{claim_items}</ul>{''.join(sections)}</body></html>
"""
