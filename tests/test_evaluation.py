"""Evaluation path: IWAE bound properties on a small trained VAE, interpolation helpers, the report."""

import pytest
import torch
from helpers import ROOT, repo_params, tiny

from mnistgen import evaluation, likelihood, report, training
from mnistgen.config import EvaluateParams
from mnistgen.models import build_model
from mnistgen.models.base import bce_per_image


@pytest.fixture(scope="module")
def small_vae():
    torch.manual_seed(0)
    x = (torch.rand(512, 1, 28, 28) < torch.linspace(0.05, 0.6, 28).view(1, 1, 28, 1)).float()
    vae = build_model(tiny("vae", epochs=3, batch_size=64, lr=3e-3, hidden=64, lr_warmup=0.0, lr_decay=False))
    training.train(vae, x, x[:64], seed=0, progress=False)
    return vae.eval(), x[:200]


def test_iwae_is_tighter_than_elbo_and_improves_with_k(small_vae):
    vae, x = small_vae
    torch.manual_seed(1)
    nelbo = torch.stack([vae.negative_elbo(x)[2] for _ in range(50)]).mean().item()  # the ELBO, well estimated
    nll = {k: vae.iwae_nll(x, k).mean().item() for k in (1, 8, 64)}
    assert nll[1] == pytest.approx(nelbo, rel=0.01)  # k = 1 is the ELBO
    assert nll[64] <= nll[8] <= nll[1] + 0.05  # the bound tightens (does not loosen) with k
    assert nll[64] < nelbo  # the IWAE bound on log p(x) is at least the ELBO


def test_iwae_chunking_is_exact_where_every_weight_is_known():
    """q(z|x) = the prior N(0, I) and a decoder blind to z: every importance weight is p(x), so the bound is
    exactly -log p(x) for any k and chunking. A chunk dropped, counted twice or misweighted moves it."""
    vae = build_model(tiny("vae")).eval()
    with torch.no_grad():
        vae.encoder[-1].weight.zero_(), vae.encoder[-1].bias.zero_()  # mu = 0, log-variance = 0
        vae.decoder[0].weight.zero_()  # the image no longer depends on z
    x = (torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    exact = bce_per_image(vae.decoder(torch.zeros(20, vae.latent_dim)), x)
    for k, chunk in ((1, 100), (64, 64), (64, 7), (50, 100)):
        torch.testing.assert_close(vae.iwae_nll(x, k, chunk=chunk), exact, rtol=1e-5, atol=1e-4, msg=f"k {k}, chunk {chunk}")


def test_slerp_and_lerp_endpoints_and_norms():
    torch.manual_seed(0)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    t = torch.linspace(0, 1, 9)
    for path in (evaluation.lerp, evaluation.slerp):
        z = path(a, b, t)
        assert z.shape == (5, 9, 8)
        assert torch.allclose(z[:, 0], a, atol=1e-5) and torch.allclose(z[:, -1], b, atol=1e-5)
    unit_a, unit_b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    assert torch.allclose(evaluation.slerp(unit_a, unit_b, t).norm(dim=2), torch.ones(5, 9), atol=1e-5)  # stays on the sphere


def test_interpolation_pairs_are_of_different_digits():
    labels = torch.arange(1000) % 10
    first, second = evaluation.interpolation_pairs(labels, 500, torch.Generator().manual_seed(0))
    assert len(first) == 500 and (labels[first] != labels[second]).all()


def _both(value, value_e2, half=0.5):
    """A distance in both spaces, each with a band of +-half."""
    return {
        "fid_cls": value,
        "fid_cls_lo": value - half,
        "fid_cls_hi": value + half,
        "fid_cls_e2": value_e2,
        "fid_cls_e2_lo": value_e2 - half,
        "fid_cls_e2_hi": value_e2 + half,
    }


def _sharp(grad, lap, grey):
    return {
        "grad_mag": grad,
        "grad_mag_stderr": 0.001,
        "laplacian_var": lap,
        "laplacian_var_stderr": 0.001,
        "grey_fraction": grey,
        "grey_fraction_stderr": 0.001,
    }


def test_report_claims_follow_the_numbers():
    results = {
        "ae": {**_both(30.0, 25.0), "interp_linear_midpoint_confidence": 0.6, "interp_linear_fid_cls": 40.0},
        "vae": {
            **_both(10.0, 9.0),
            **_sharp(0.10, 0.05, 0.30),
            "interp_linear_midpoint_confidence": 0.8,
            "interp_linear_fid_cls": 15.0,
        },
        "gan": {**_both(5.0, 4.0), **_sharp(0.15, 0.09, 0.15)},
        "wgan": {**_both(8.0, 6.0), **_sharp(0.14, 0.08, 0.18)},
    }
    curves = {"wgan": {"grad_norm": [1.2, 1.05], "wasserstein": [5.0, 2.0]}}
    checks = report.claims(results, curves)
    assert [v for _, v, _ in checks] == [report.HOLDS] * 6
    assert "holds in both feature spaces" in checks[0][2]
    results["ae"].update(_both(4.5, 3.5))  # now the AE samples look better than the VAE's in both spaces: the claim must fail
    assert report.claims(results, curves)[0][1] == report.FAILS
    assert report.winners(results)["fid_cls"] == "ae"


def test_a_tie_has_no_winner_and_numbers_keep_one_format():
    results = {"ae": {"classes_present": 10.0, "fid_cls": 13.754}, "vae": {"classes_present": 10.0, "fid_cls": 1.7436}}
    assert report.winners(results) == {"fid_cls": "vae"}  # classes_present: both 10, no winner
    assert [report.fmt(v) for v in (13.754, 1.7436, 103.163, 0.4917, 0.01544, 4.2e-4, 0.0)] == [
        "13.75",
        "1.74",
        "103.16",
        "0.492",
        "0.0154",
        "4.20e-04",
        "0.00",
    ]


def test_a_claim_holds_only_if_it_holds_in_both_feature_spaces():
    results = {"ae": _both(30.0, 7.0), "vae": _both(10.0, 9.0)}  # worse in space 1, better in space 2
    ((claim, outcome, evidence),) = report.claims(results, {})
    assert outcome == report.FAILS and "evaluator 1: holds; evaluator 2: does not hold" in evidence
    results["ae"] = _both(30.0, 9.2)  # bands overlap in space 2
    ((claim, outcome, evidence),) = report.claims(results, {})
    assert outcome == report.TOO_CLOSE and "evaluator 2: too close to call" in evidence


def test_a_gap_inside_the_bands_is_too_close_to_call():
    results = {"ae": _both(10.4, 9.5, half=0.5), "vae": _both(10.0, 9.0, half=0.5)}
    assert report.claims(results, {})[0][1] == report.TOO_CLOSE
    results["ae"] = _both(11.2, 10.1, half=0.5)  # 1.2 and 1.1 apart: the bands no longer overlap
    assert report.claims(results, {})[0][1] == report.HOLDS


def test_the_sharpness_claim_rests_on_sharpness_not_on_fid():
    results = {
        "vae": {**_both(20.0, 20.0), **_sharp(0.10, 0.05, 0.30)},
        "gan": {**_both(5.0, 5.0), **_sharp(0.08, 0.04, 0.35)},
    }  # a better FID, but blurrier samples
    verdicts = {c: v for c, v, _ in report.claims(results, {})}
    sharper = next(c for c in verdicts if "sharper" in c)
    closer = next(c for c in verdicts if "closer to the data" in c)
    assert verdicts[sharper] == report.FAILS and verdicts[closer] == report.HOLDS


def test_the_wasserstein_claim_fails_on_a_rising_curve():
    norms = [1.1, 1.0, 1.02]
    assert report.claims({}, {"wgan": {"grad_norm": norms, "wasserstein": [5.0, 3.0, 1.0]}})[0][1] == report.HOLDS
    for rising in ([1.0, 3.0, 5.0], [1.0, 0.5, 1.1], [5.0, 4.9, 4.8]):  # rises; ends above its start; falls by under 10 %
        assert report.claims({}, {"wgan": {"grad_norm": norms, "wasserstein": rising}})[0][1] == report.FAILS, rising
    assert not report.wasserstein_falls([2.0, 4.0, 6.0, 8.0, 1.7])  # last below first, but the trend rises


def test_rank_agreement_between_the_spaces():
    same = {m: {"fid_cls": v, "fid_cls_e2": 2 * v} for m, v in zip("abcd", (1.0, 2.0, 3.0, 4.0))}
    assert report.rank_agreement(same)["fid_cls"] == 1.0
    flipped = {m: {"fid_cls": v, "fid_cls_e2": -v} for m, v in zip("abcd", (1.0, 2.0, 3.0, 4.0))}
    assert report.rank_agreement(flipped)["fid_cls"] == -1.0
    page = report.build_markdown(same, {}, {}, [])
    assert "Kendall tau" in page and "fid_cls +1.00" in page


def test_the_table_shows_bands():
    results = {"gan": _both(5.0, 4.0), "vae": _both(10.0, 9.0)}
    page = report.build_markdown(results, {"fid_cls": 0.3, "fid_cls_lo": 0.25, "fid_cls_hi": 0.35}, {}, [])
    assert "5.00 [4.50, 5.50]" in page and "0.300 [0.250, 0.350]" in page and "FID_cls, evaluator 2" in page


def test_a_gap_within_two_standard_errors_is_too_close_to_call():
    key = "interp_linear_midpoint_confidence"
    results = {"ae": {key: 0.838, f"{key}_stderr": 0.006}, "vae": {key: 0.839, f"{key}_stderr": 0.006}}
    ((claim, outcome, evidence),) = report.claims(results, {})
    assert outcome == report.TOO_CLOSE and "AE 0.838 ± 0.00600 vs VAE 0.839 ± 0.00600" in evidence
    assert report.TOO_CLOSE in report.build_markdown(results, {}, {}, report.claims(results, {}))
    results["ae"][key] = 0.80  # 0.039 apart, more than 2 * 0.0085: the VAE's midpoints are clearly better
    assert report.claims(results, {})[0][1] == report.HOLDS
    results["ae"][key] = 0.88
    assert report.claims(results, {})[0][1] == report.FAILS


# ---------------------------------------------------------------- protocol fixes


def test_binarize_seed_changes_the_binarisation_and_is_what_likelihood_uses(small_vae, monkeypatch, tmp_path):
    x = torch.rand(300, 1, 28, 28)
    assert torch.equal(likelihood.binarize(x, 0), likelihood.binarize(x, 0))
    assert not torch.equal(likelihood.binarize(x, 0), likelihood.binarize(x, 1))
    seen = []
    real_binarize = likelihood.binarize
    monkeypatch.setattr(likelihood, "binarize", lambda images, seed: seen.append(seed) or real_binarize(images, seed))
    vae, _ = small_vae
    job = evaluation.Evaluation(vae, {"": _FakeClassifier()}, _params(binarize_seed=17, iwae_k=2))
    job.prepare({"": _fake_reference()}, tmp_path)
    job.likelihood(x, torch.arange(len(x)) % 10)
    assert seen == [17]


def test_elbo_and_iwae_use_the_same_images_and_never_read_past_the_subset(small_vae, monkeypatch, tmp_path):
    """150 images (not a multiple of the 20-image IWAE call) out of 300: exactly those 150, for both bounds."""
    vae, _ = small_vae
    x = torch.rand(300, 1, 28, 28)
    seen = {"iwae": [], "elbo": []}
    iwae, elbo = vae.iwae_nlls, vae.negative_elbo
    monkeypatch.setattr(
        vae, "iwae_nlls", lambda images, k, chunk, priors, gen: seen["iwae"].append(images) or iwae(images, k, chunk, priors, gen)
    )
    monkeypatch.setattr(
        vae,
        "negative_elbo",
        lambda images, beta=1.0, y=None, eps=None: seen["elbo"].append(images) or elbo(images, beta, y=y, eps=eps),
    )
    job = evaluation.Evaluation(vae, {"": _FakeClassifier()}, _params(iwae_images=150, iwae_k=2))
    job.prepare({"": _fake_reference()}, tmp_path)
    job.likelihood(x, torch.arange(len(x)) % 10)
    iwae_images = torch.cat(seen["iwae"])
    elbo_binarised = torch.cat(seen["elbo"][len(seen["elbo"]) // 2 :])  # grey batches first, then the binarised ones
    assert len(iwae_images) == 150 and job.metrics["iwae_images"] == 150 and job.metrics["likelihood_images"] == 150
    assert torch.equal(iwae_images, elbo_binarised)  # the same (binarised) images in both bounds
    idx = likelihood.likelihood_subset(300, 150, 3)
    assert len(set(idx.tolist())) == 150 and idx.max() >= 150  # a random subset, not the first 150
    assert torch.equal(likelihood.likelihood_subset(300, 0, 3), torch.arange(300))
    assert job.metrics["likelihood_all_images"] == 0.0


def test_the_iwae_bound_runs_in_cache_sized_calls_and_conv_nets_in_the_faster_layout(small_vae, monkeypatch, tmp_path):
    """At most 4,000 decoder passes a call (20,000 took twice as long on a 2-core CPU: docs/benchmarks.md), every
    image once; and the evaluated model's conv weights in the device's layout (channels_last on a CPU), as in training."""
    vae, _ = small_vae
    calls = []
    iwae = vae.iwae_nlls
    monkeypatch.setattr(
        vae,
        "iwae_nlls",
        lambda images, k, chunk, priors, gen: calls.append((len(images), min(k, chunk))) or iwae(images, k, chunk, priors, gen),
    )
    x = torch.rand(100, 1, 28, 28)
    job = evaluation.Evaluation(vae, {"": _FakeClassifier()}, _params(iwae_images=0, iwae_k=1000))
    job.prepare({"": _fake_reference()}, tmp_path)
    job.likelihood(x, torch.arange(len(x)) % 10)
    assert sum(n for n, _ in calls) == 100 and max(n * chunk for n, chunk in calls) <= 4000, calls
    conv = build_model(tiny("vae", arch="conv", width=4))
    assert not conv.decoder[4].weight.is_contiguous(memory_format=torch.channels_last)  # as built
    evaluation.Evaluation(conv, {"": _FakeClassifier()}, _params())
    assert conv.decoder[4].weight.is_contiguous(memory_format=torch.channels_last)


def test_the_cvae_bound_given_the_label_reuses_the_marginal_bounds_draws_and_decoder_passes(tmp_path):
    """Each bound equals the one computed alone from the same seed, and both together cost k decoder passes per
    image, not 2k. The evaluation asks for both on the test split only, in one pass."""
    cvae = build_model(tiny("cvae")).eval()
    x = (torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    y = torch.arange(6) % 10
    alone = []
    for labels in (None, y):
        torch.manual_seed(5)
        alone.append(cvae.iwae_nll(x, 16, chunk=5, y=labels))
    decoded = []
    hook = cvae.decoder.register_forward_hook(lambda module, inputs, out: decoded.append(len(out)))
    torch.manual_seed(5)
    together = cvae.iwae_nlls(x, 16, chunk=5, priors=[None, y])
    hook.remove()
    assert sum(decoded) == 16 * len(x)
    for a, b in zip(together, alone):
        assert torch.equal(a, b)
    assert not torch.equal(*together)  # the two priors give two bounds

    asked = []
    bound = cvae.iwae_nlls
    cvae.iwae_nlls = lambda images, k, chunk, priors, generator: (
        asked.append(len(priors)) or bound(images, k, chunk, priors, generator)
    )
    job = evaluation.Evaluation(cvae, {"": _FakeClassifier()}, _params(iwae_images=0, iwae_k=8))
    for split in ("val", "test"):
        reference = _fake_reference()
        reference.split = split
        job.prepare({"": reference}, tmp_path)
        job.likelihood(x, y)
        assert ("iwae_nll_given_label" in job.metrics) == (split == "test")
    assert asked == [1, 2]  # one call per split (6 images), the test split's with both priors


class _FakeClassifier(torch.nn.Module):
    def features_and_probs(self, images, batch_size=1000):
        flat = images.flatten(1)
        return flat[:, :8], torch.softmax(flat[:, :10], 1)


def _fake_reference():
    g = torch.Generator().manual_seed(0)
    return evaluation.Reference(
        torch.rand(200, 8, generator=g),
        torch.softmax(torch.rand(200, 10, generator=g), 1),
        torch.rand(200, 8, generator=g),
        torch.softmax(torch.rand(200, 10, generator=g), 1),
        "h",
    )


def _params(**changes):
    from mnistgen.config import EvaluateParams, load_section

    base = load_section(EvaluateParams, "evaluate", ROOT / "params.yaml").model_dump()
    return EvaluateParams(
        **{
            **base,
            "batch_size": 64,
            "num_samples": 100,
            "kid_subsets": 2,
            "kid_subset_size": 50,
            "is_splits": 2,
            "interp_pairs": 20,
            "bootstrap": 20,
            **changes,
        }
    )


def test_interpolation_paths_start_from_the_held_out_images_and_have_bands(small_vae, tmp_path):
    vae, _ = small_vae
    val_x, val_y = torch.rand(100, 1, 28, 28), torch.arange(100) % 10
    encoded = []
    encode = vae.encode
    vae.encode = lambda images: encoded.append(images) or encode(images)
    try:
        job = evaluation.Evaluation(vae, {"": _FakeClassifier(), "_e2": _FakeClassifier()}, _params())
        job.prepare({"": _fake_reference(), "_e2": _fake_reference()}, tmp_path)
        job.interpolation(val_x, val_y)
    finally:
        del vae.encode
    assert all(any(torch.equal(row, v) for v in val_x) for row in encoded[0][:5])
    m = job.metrics
    assert m["interp_points"] == 20 * 7
    for key in ("interp_linear_fid_cls", "interp_linear_fid_cls_e2", "interp_slerp_fid_cls_e2"):
        assert m[f"{key}_lo"] <= m[key] <= m[f"{key}_hi"]
    assert "interp_linear_midpoint_confidence_e2_stderr" in m


@pytest.mark.parametrize("family", ["gan", "cwgan", "vae"])
def test_the_draws_depend_on_the_seed_not_on_the_batch_size(family):
    """Every sample's noise and a conditional model's label mix are drawn at once on a CPU generator, then decoded in
    batches: evaluate.batch_size only chunks the work, as the protocol (which leaves it out) says."""
    torch.manual_seed(0)
    model = build_model(tiny(family, arch="conv", width=8)).eval()
    drawn = [evaluation.draw(model, 300, torch.Generator().manual_seed(5), size) for size in (64, 128, 300)]
    assert all(torch.equal(drawn[0], other) for other in drawn[1:])
    assert not torch.equal(drawn[0], evaluation.draw(model, 300, torch.Generator().manual_seed(6), 64))


def test_the_fingerprint_names_the_device_the_torch_and_the_measuring_code_but_not_its_docstrings(monkeypatch):
    from mnistgen import protocol
    from mnistgen.models import FAMILIES

    documented = 'def f(x):\n    """Doc."""\n    # a comment\n    return x + 1\n'
    assert protocol.without_docstrings(documented) == protocol.without_docstrings("def f(x):\n    return x + 1\n")
    assert protocol.without_docstrings(documented) != protocol.without_docstrings("def f(x):\n    return x + 2\n")
    p = EvaluateParams(**repo_params()["evaluate"])
    terms = protocol.describe(p, "val", "d", {"": "h"}, "cpu", FAMILIES["vae"], (evaluation,))
    assert terms["device"] == "cpu" and terms["torch"] == torch.__version__ and "batch_size" not in terms["evaluate"]
    assert (
        protocol.describe(p, "val", "d", {"": "h"}, torch.device("cuda", 1), FAMILIES["vae"], (evaluation,))["device"] == "cuda"
    )
    code = terms["code"]
    assert protocol.measuring_code(FAMILIES["gan"], (evaluation,)) != protocol.measuring_code(FAMILIES["vae"], (evaluation,))

    def sample_latent(self, n, generator=None):  # another way of drawing the noise: another protocol
        return torch.zeros(n, self.latent_dim)

    monkeypatch.setattr(FAMILIES["vae"], "sample_latent", sample_latent)
    protocol.measuring_code.cache_clear()  # a process's code never changes but here
    assert protocol.describe(p, "val", "d", {"": "h"}, "cpu", FAMILIES["vae"], (evaluation,))["code"] != code
    monkeypatch.undo()
    protocol.measuring_code.cache_clear()

    def decode(self, z):  # a network's forward is the model, not the ruler
        return z

    monkeypatch.setattr(FAMILIES["vae"], "decode", decode)
    protocol.measuring_code.cache_clear()
    assert protocol.describe(p, "val", "d", {"": "h"}, "cpu", FAMILIES["vae"], (evaluation,))["code"] == code
