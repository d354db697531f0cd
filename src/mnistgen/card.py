"""The model card of a registered version: what the model is, in markdown (pure: text from values).

The promote stage writes it as the version's description, which the MLflow UI shows on the version's
page, and logs it as model_card.md into the version's run. Every figure it quotes is the version's own
validation metric as registered (a test checks the card against the metrics it quotes).
"""

from __future__ import annotations

from typing import Any

from .gate import Decision

HEADLINE = [
    "fid_cls",
    "fid_cls_e2",
    "precision",
    "recall",
    "is_cls",
    "recon_mse",
    "iwae_nll",
    "iwae_nll_given_label",
    "label_fidelity",
]
LIMITS = {
    "ae": "A deterministic autoencoder: its prior is a Gaussian fitted to the training codes, so samples are only as good as that fit.",
    "vae": "Trained and scored on binarised digits; the IWAE figure is an upper bound on -log p(x), not the likelihood itself.",
    "gan": "No encoder and no likelihood; judged by feature-space distances of 28x28 samples only.",
    "wgan": "No encoder and no likelihood; judged by feature-space distances of 28x28 samples only.",
    "cvae": "Its decoder sees only z: a digit is asked for through the class prior, and overlapping priors cost label fidelity.",
    "cwgan": "No encoder and no likelihood; its FID_cls is that of a label-balanced mix.",
}


def fmt(value) -> str:
    """Two decimals from 1 up (FID 13.75, -ELBO 103.16), three significant digits below (KID 0.0154, precision 0.492)."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:#.3g}"
    return str(value)


def cell(r: dict, key: str) -> str:
    """A value with its noise band, '13.73 [13.52, 13.97]', or with its standard error; and, where the results carry
    it (`<key>_seed_sd`), its standard deviation over training seeds: '13.73 [13.52, 13.97]; sd 0.52'."""
    if key not in r:
        return "–"
    if f"{key}_lo" in r and f"{key}_hi" in r:
        text = f"{fmt(r[key])} [{fmt(r[f'{key}_lo'])}, {fmt(r[f'{key}_hi'])}]"
    elif r.get(f"{key}_stderr"):
        text = f"{fmt(r[key])} ± {fmt(r[f'{key}_stderr'])}"
    else:
        text = fmt(r[key])
    return text + (f"; sd {fmt(r[f'{key}_seed_sd'])}" if f"{key}_seed_sd" in r else "")


def model_card(d: Decision, tags: dict[str, str], protocol: dict[str, Any], run_id: str, metrics: dict[str, float]) -> str:
    """The card of the version the promotion registered for decision `d` (tags: the version's, protocol: its own)."""
    model, family, grade, version = d.model, tags.get("family", "?"), d.candidate_grade or "unknown", d.candidate_version
    rows = [f"| {key} | {cell(metrics, key)} |" for key in HEADLINE if key in metrics]
    verdicts = [
        f"| {v.metric} | {v.improvement:.4g} | {v.eval_sd:.3g} | {v.training_sd:.3g} | {v.threshold:.3g} | {v.outcome} |"
        for v in d.verdicts
    ]
    evaluators = ", ".join(f"`{h[:12]}`" for h in protocol.get("evaluators", {}).values())
    evaluate = protocol.get("evaluate", {})
    return "\n".join(
        [
            f"# mnist-{model} v{version}: {family.upper()}, {grade} grade",
            "",
            f"A {family.upper()} trained on MNIST ({grade} grade, earned by its recipe; claimed {tags.get('grade_claimed', '?')}). "
            f"Run `{run_id}`, commit `{tags.get('git_commit', '?')[:12]}`, params hash `{tags.get('params_hash', '?')[:12]}`, "
            f"recipe `{tags.get('recipe', '?')}`.",
            "",
            "## Data and protocol",
            "",
            f"- Data: DVC hash `{tags.get('data_hash', '?')}`; measured on the **{protocol.get('split', '?')}** split "
            f"(sha256 `{str(protocol.get('data', '?'))[:12]}`).",
            f"- Protocol fingerprint `{d.candidate_protocol}`: evaluators {evaluators}, {evaluate.get('num_samples', '?')} samples, "
            f"IWAE k = {evaluate.get('iwae_k', '?')}, seed {evaluate.get('seed', '?')}, on {protocol.get('device', '?')} with torch "
            f"{protocol.get('torch', '?')}.",
            "",
            "## Headline metrics (validation)",
            "",
            "Bands are bootstrap intervals over the evaluation's samples.",
            "",
            "| metric | value [band] |",
            "| --- | --- |",
            *rows,
            "",
            f"Sample grid: `evaluation/samples.png` among this run's artifacts (run `{run_id}`).",
            "",
            "## Gate",
            "",
            f"**{d.decision}**: {d.reason}.",
            *(
                [
                    "",
                    f"Against champion v{d.champion_version}, at alpha {d.alpha} (K = {d.trials}); training noise: {d.noise_source}.",
                    "",
                    "| metric | improvement d | evaluation sd | training sd | threshold | outcome |",
                    "| --- | --- | --- | --- | --- | --- |",
                    *verdicts,
                ]
                if verdicts
                else []
            ),
            "",
            "## Known limits",
            "",
            f"- {LIMITS.get(family, 'See docs/models.md.')}",
            "- Measured on one CPU: another CPU gives other floats, within the training noise; bit-equality holds only on the same CPU.",
            "- Feature-space metrics (FID_cls, precision, recall) use small MNIST classifiers, not Inception: they compare models "
            "here, not with published FIDs.",
            *(["- A smoke-grade model, trained on a subset: never a team champion."] if grade == "smoke" else []),
            "",
        ]
    )
