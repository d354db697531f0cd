"""Evaluation path: IWAE bound properties on a small trained VAE, interpolation helpers, the report."""
import pytest
import torch

from mnistgen import evaluation, report, training
from helpers import tiny
from mnistgen.models import build_model


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


def test_iwae_chunking_gives_the_same_estimate(small_vae):
    vae, x = small_vae
    torch.manual_seed(2)
    a = vae.iwae_nll(x[:20], 64, chunk=64)
    torch.manual_seed(2)
    b = vae.iwae_nll(x[:20], 64, chunk=64)
    assert torch.allclose(a, b)
    c = vae.iwae_nll(x[:20], 64, chunk=7)  # a different chunking: the same bound up to Monte Carlo noise
    assert abs(c.mean() - a.mean()) < 0.05 * a.mean().abs()


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


def test_report_claims_follow_the_numbers():
    results = {"ae": {"fid_cls": 30.0, "interp_linear_midpoint_confidence": 0.6, "interp_linear_fid_cls": 40.0},
               "vae": {"fid_cls": 10.0, "interp_linear_midpoint_confidence": 0.8, "interp_linear_fid_cls": 15.0},
               "gan": {"fid_cls": 5.0}, "wgan": {"fid_cls": 8.0}}
    curves = {"wgan": {"grad_norm": [1.2, 1.05], "wasserstein": [5.0, 2.0]}}
    checks = report.claims(results, curves)
    assert [v for _, v, _ in checks] == [report.HOLDS] * 5
    results["ae"]["fid_cls"] = 5.0  # now the AE samples look better than the VAE's: the claim must fail
    assert report.claims(results, curves)[0][1] == report.FAILS
    assert report.winners(results)["fid_cls"] == "ae"


def test_a_gap_within_two_standard_errors_is_too_close_to_call():
    key = "interp_linear_midpoint_confidence"
    results = {"ae": {key: 0.838, f"{key}_stderr": 0.006}, "vae": {key: 0.839, f"{key}_stderr": 0.006}}
    (claim, outcome, evidence), = report.claims(results, {})
    assert outcome == report.TOO_CLOSE and "standard errors 0.0060 and 0.0060" in evidence
    assert report.TOO_CLOSE in report.build_markdown(results, {}, {}, report.claims(results, {}))
    results["ae"][key] = 0.80  # 0.039 apart, more than 2 * 0.0085: the VAE's midpoints are clearly better
    assert report.claims(results, {})[0][1] == report.HOLDS
    results["ae"][key] = 0.88
    assert report.claims(results, {})[0][1] == report.FAILS
