"""The conditional families (cvae, cwgan): objectives, the harness with labels, label fidelity, the pyfunc's digit."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import post_invocation, repo_params, served_model, tiny, tiny_model_params, write_params, write_prepared
from torch import nn

from mnistgen import evaluation, figures, report, training
from mnistgen.config import EvaluateParams
from mnistgen.models import build_model
from mnistgen.models.base import GenerativeModel
from mnistgen.models.vae import kl_divergence
from mnistgen.models.wgan import autograd_norm, difference_quotient, with_label
from mnistgen.utils import StageError, seed_everything


def test_cvae_kl_is_against_the_class_mean_prior():
    """KL(q(z|x) || N(mu_y, I)) per image equals torch.distributions' KL with each image's class mean."""
    torch.manual_seed(0)
    cvae = build_model(tiny("cvae"))
    x, y = torch.rand(6, 1, 28, 28), torch.tensor([0, 3, 3, 7, 9, 1])
    _, kl, _ = cvae.negative_elbo(x, y=y)
    mu, logvar = cvae.posterior(x)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(cvae.class_means[y], torch.ones_like(mu))
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(q, p).sum(1), atol=1e-4, rtol=1e-5)
    assert not torch.allclose(kl, kl_divergence(mu, logvar))  # not the VAE's N(0, I)
    with pytest.raises(ValueError, match="needs the labels"):
        cvae.negative_elbo(x)


def test_cvae_kl_trains_the_class_means():
    cvae = build_model(tiny("cvae"))
    _, kl, _ = cvae.negative_elbo(torch.rand(4, 1, 28, 28), y=torch.tensor([2, 2, 5, 5]))
    kl.sum().backward()
    moved = cvae.class_means.grad.abs().sum(1) > 0
    assert moved.tolist() == [d in (2, 5) for d in range(10)]  # only the classes in the batch get a gradient


def test_cvae_samples_a_digit_around_its_own_mean():
    """Sampling a 7 is z ~ N(mu_7, I), then decode."""
    cvae = build_model(tiny("cvae")).eval()
    sevens = torch.full((20000,), 7)
    z = cvae.noise_to_latent(cvae.sample_latent(20000, torch.Generator().manual_seed(0)), sevens)
    torch.testing.assert_close(z.mean(0), cvae.class_means[7].detach(), atol=0.05, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(4), atol=0.05, rtol=0)
    eps = cvae.sample_latent(5, torch.Generator().manual_seed(1))
    expected = cvae.decode(cvae.class_means[7] + eps)
    torch.testing.assert_close(cvae.sample(5, torch.Generator().manual_seed(1), torch.full((5,), 7)), expected)
    assert torch.equal(cvae.class_latent_means(), cvae.class_means.detach())


def test_cwgan_generator_and_critic_take_the_label():
    torch.manual_seed(0)
    cwgan = build_model(tiny("cwgan", arch="conv", width=4)).eval()
    z = torch.randn(3, 4)
    a, b = cwgan.decode(z, torch.tensor([1, 1, 1])), cwgan.decode(z, torch.tensor([8, 8, 8]))
    assert a.shape == (3, 1, 28, 28) and not torch.allclose(a, b)
    x = torch.rand(3, 1, 28, 28)
    assert not torch.allclose(cwgan.score(x, torch.tensor([1, 1, 1])), cwgan.score(x, torch.tensor([8, 8, 8])))
    assert cwgan.critic(x, torch.tensor([0, 1, 2])).shape == (3, 1)


@pytest.mark.parametrize("gradient", ["autograd", "finite_difference"])
def test_cwgan_penalty_equals_the_wgan_one_for_a_label_independent_critic(gradient):
    """With embed(y) = 0, D(x, y) = psi(phi(x)): the conditional penalty is the unconditional function's."""
    torch.manual_seed(0)
    cwgan = build_model(tiny("cwgan", arch="conv", width=4, gradient=gradient))
    nn.init.zeros_(cwgan.critic.embed.weight)
    real, fake, y = torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    torch.manual_seed(1)
    conditional = cwgan.gradient_norm(real, fake, y)
    torch.manual_seed(1)
    unconditional = (difference_quotient if gradient == "finite_difference" else autograd_norm)(
        lambda img: cwgan.critic.psi(cwgan.critic.phi(img)), real, fake
    )
    torch.testing.assert_close(conditional, unconditional)


def test_cwgan_penalty_is_the_image_gradient_with_the_label_fixed():
    torch.manual_seed(0)
    cwgan = build_model(tiny("cwgan", arch="conv", width=4))
    real, fake, y = torch.rand(5, 1, 28, 28), torch.rand(5, 1, 28, 28), torch.tensor([0, 4, 4, 9, 2])
    eps = torch.rand(5, 1, 1, 1)
    norm = autograd_norm(with_label(cwgan.critic, y), real, fake, eps)
    point = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(cwgan.critic(point, y).sum(), point)
    torch.testing.assert_close(norm, grad.flatten(1).norm(dim=1))
    # the finite-difference quotient scores two batches at once: the labels are tiled to match
    assert difference_quotient(with_label(cwgan.critic, y), real, fake).shape == (5,)


def conditional_run(family, tmp_path, epochs=3, on_epoch=None):
    seed_everything(0, deterministic=True)
    model = build_model(tiny(family, epochs=epochs, batch_size=16, lr_warmup=0.0, lr_decay=False))  # a tiny MLP
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(96, 1, 28, 28, generator=g), torch.randint(0, 10, (96,), generator=g)
    ckpt = training.Checkpoint(tmp_path / "last.pt", {"family": family})
    history = training.train(
        model, x, x[:32], seed=0, checkpoint=ckpt, on_epoch=on_epoch, progress=False, train_labels=y, val_labels=y[:32]
    )
    return model, history


@pytest.mark.parametrize("family", ["cvae", "cwgan"])
def test_harness_trains_a_conditional_model_and_resumes_exactly(tmp_path, family):
    reference, ref_history = conditional_run(family, tmp_path / "a")

    def interrupt(epoch, metrics, model):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        conditional_run(family, tmp_path / "b", on_epoch=interrupt)
    resumed, history = conditional_run(family, tmp_path / "b")
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert history == [
        {**h, "epoch_seconds": r["epoch_seconds"], "images_per_second": r["images_per_second"]}
        for h, r in zip(ref_history, history)
    ]


def test_the_harness_passes_each_batch_its_own_labels(monkeypatch):
    model = build_model(tiny("cvae", epochs=1, batch_size=16, lr_warmup=0.0, lr_decay=False))
    x = torch.arange(64, dtype=torch.float32).view(64, 1, 1, 1).expand(64, 1, 28, 28) / 64
    labels = torch.arange(64) % 10
    seen = []

    def record(batch, optimizers, step, y=None):
        seen.append(((batch[:, 0, 0, 0] * 64).round().long(), y))
        return {"loss": torch.zeros(())}

    monkeypatch.setattr(model, "train_step", record)
    training.train(model, x, x[:16], seed=0, progress=False, train_labels=labels, val_labels=labels[:16])
    assert len(seen) == 4
    for index, y in seen:
        assert torch.equal(y, labels[index])  # the image's own label, through the same permutation
    with pytest.raises(StageError, match="cvae is conditional: training needs the labels"):
        training.train(build_model(tiny("cvae")), x, x[:16], seed=0, progress=False)


# ---------------------------------------------------------------- label fidelity


class TemplateClassifier(nn.Module):
    """A stand-in evaluator for helpers.write_prepared's synthetic digits: nearest class template."""

    def __init__(self, templates):
        super().__init__()
        self.templates = templates  # [10, 784]

    def features_and_probs(self, images, batch_size=1000):
        distances = torch.cdist(images.flatten(1), self.templates)
        return distances, torch.softmax(-distances, dim=1)


class MeanImageGenerator(GenerativeModel):
    """A conditional 'model' decoding each digit to its class's mean image (plus a little noise), or, with
    ignore_label, to a random class's. No `family` of its own: defining it registers nothing."""

    conditional = True

    def __init__(self, templates, ignore_label=False):
        nn.Module.__init__(self)
        self.family, self.latent_dim, self.templates, self.ignore_label = "perfect", 4, templates, ignore_label
        self.anchor = nn.Parameter(torch.zeros(1))

    def decode(self, z, labels=None):
        if self.ignore_label:
            labels = (z[:, 0].abs() * 1000).long() % 10  # a digit chosen by the noise, not by the label
        return (self.templates[labels] + 0.02 * z[:, 1:2]).clamp(0, 1).view(-1, 1, 28, 28)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from mnistgen import data

    folder = tmp_path_factory.mktemp("prepared")
    write_prepared(folder, n_train=200, n_val=10, n_test=400)
    with data.reading_test("evaluate"):
        train, test = data.load_split(folder, "train"), data.load_split(folder, "test")
    train_x, test_x = data.to_float(train.images), data.to_float(test.images)
    templates = torch.stack([train_x[train.labels == d].mean(0).flatten() for d in range(10)])
    classifier = TemplateClassifier(templates)
    feats, probs = classifier.features_and_probs(test_x)
    ref = evaluation.Reference(feats, probs, feats, probs, "test")
    params = EvaluateParams(**{**repo_params()["evaluate"], "per_class_samples": 50, "num_samples": 200, "batch_size": 100})
    return templates, classifier, ref, params, test.labels


@pytest.mark.parametrize("ignore_label, expected", [(False, 1.0), (True, 0.1)])
def test_label_fidelity_of_a_perfect_and_of_a_label_ignoring_generator(synthetic, tmp_path, ignore_label, expected):
    templates, classifier, ref, params, test_y = synthetic
    job = evaluation.Evaluation(MeanImageGenerator(templates, ignore_label), {"": classifier}, params)
    job.prepare({"": ref}, tmp_path)
    job.conditional_samples(test_y)
    assert job.metrics["label_fidelity"] == pytest.approx(expected, abs=0.05)
    assert job.metrics["label_fidelity_stderr"] <= 0.015
    per_digit = [job.metrics[f"label_fidelity_digit_{d}"] for d in range(10)]
    assert sum(per_digit) / 10 == pytest.approx(job.metrics["label_fidelity"])
    assert job.metrics["fid_cls_per_class_mean"] == pytest.approx(sum(job.metrics[f"fid_cls_digit_{d}"] for d in range(10)) / 10)
    for figure in ("digit_grid.png", "samples_by_class.png"):
        assert (tmp_path / figure).stat().st_size > 500


def test_per_class_fid_is_lower_when_each_digit_looks_like_its_class(synthetic, tmp_path):
    templates, classifier, ref, params, test_y = synthetic
    scores = {}
    for ignore in (False, True):
        job = evaluation.Evaluation(MeanImageGenerator(templates, ignore), {"": classifier}, params)
        job.prepare({"": ref}, tmp_path / str(ignore))
        job.conditional_samples(test_y)
        scores[ignore] = job.metrics["fid_cls_per_class_mean"]
    assert scores[False] < 0.5 * scores[True]


def test_a_conditional_model_without_a_digit_samples_a_balanced_mix(synthetic):
    templates = synthetic[0]
    model = MeanImageGenerator(templates)
    images = model.sample(30, torch.Generator().manual_seed(0))
    _, probs = synthetic[1].features_and_probs(images)
    assert probs.argmax(1).tolist() == [d % 10 for d in range(30)]


def test_latent_scatter_marks_the_class_means(tmp_path):
    g = torch.Generator().manual_seed(0)
    means = torch.randn(10, 6, generator=g) * 4
    labels = torch.arange(500) % 10
    codes = means[labels] + torch.randn(500, 6, generator=g)
    path = figures.latent_scatter(codes, labels, tmp_path / "scatter.png", "cvae", means=means)
    assert path.stat().st_size > 5000


def test_report_claims_on_conditional_models():
    results = {
        "vae": {"latent_silhouette": 0.05, "latent_silhouette_stderr": 0.002, "class_tv_to_uniform": 0.05, "fid_cls": 15.0},
        "cvae": {
            "latent_silhouette": 0.30,
            "latent_silhouette_stderr": 0.003,
            "label_fidelity": 0.96,
            "label_fidelity_stderr": 0.002,
        },
        "cwgan": {"label_fidelity": 0.93, "label_fidelity_stderr": 0.0025},
    }
    checks = {c: (v, e) for c, v, e in report.claims(results, {})}
    cluster = next(c for c in checks if "cluster" in c)
    keep = next(c for c in checks if "requested digit" in c)
    assert checks[cluster][0] == report.HOLDS and "0.300" in checks[cluster][1]
    assert checks[keep][0] == report.HOLDS and "CWGAN 0.930" in checks[keep][1] and "VAE 0.0500" in checks[keep][1]
    results["cwgan"]["label_fidelity"] = 0.5
    assert {c: v for c, v, _ in report.claims(results, {})}[keep] == report.FAILS
    results["cwgan"]["label_fidelity"] = 0.902  # within two standard errors of the 0.9 bar
    assert {c: v for c, v, _ in report.claims(results, {})}[keep] == report.TOO_CLOSE
    results["cvae"]["latent_silhouette"] = 0.051
    assert {c: v for c, v, _ in report.claims(results, {})}[cluster] == report.TOO_CLOSE
    markdown = report.build_markdown(results, {}, {}, report.claims(results, {}))
    assert "label fidelity" in markdown and "conditional on the label" in markdown


# ---------------------------------------------------------------- the registered model's digit


def pyfunc_for(model):
    from mnistgen.pyfunc_model import MnistGenerator

    wrapper = MnistGenerator()
    wrapper.model = model.eval()
    return wrapper


@pytest.mark.parametrize("family", ["cvae", "cwgan"])
def test_pyfunc_gives_the_digit_asked_for_and_refuses_one_outside_0_9(family):
    from mlflow.exceptions import MlflowException

    torch.manual_seed(0)
    predictor = pyfunc_for(build_model(tiny(family)))
    sevens = predictor.predict(None, np.zeros((1, 5), np.float32), params={"digit": 7, "count": 16, "seed": 3})
    assert sevens.shape == (16, 28, 28) and sevens.dtype == np.float32
    expected = predictor.model.sample(16, torch.Generator().manual_seed(3), torch.full((16,), 7)).squeeze(1).numpy()
    np.testing.assert_allclose(sevens, expected)
    for bad in (10, -1):
        with pytest.raises(MlflowException, match=rf"digit must be an integer 0-9, got {bad}") as err:
            predictor.predict(None, np.zeros((1, 5), np.float32), params={"digit": bad, "count": 4})
        assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    rows = np.concatenate([np.zeros((3, 4), np.float32), np.array([[0], [7], [9]], np.float32)], axis=1)
    images = predictor.predict(None, rows)
    assert images.shape == (3, 28, 28)
    with torch.no_grad():
        expected = predictor.model.decode_noise(torch.zeros(3, 4), torch.tensor([0, 7, 9])).squeeze(1).numpy()
    np.testing.assert_allclose(images, expected)
    with pytest.raises(MlflowException, match="digit column .* integers 0-9, got 12"):
        predictor.predict(None, np.concatenate([rows[:, :4], np.full((3, 1), 12, np.float32)], axis=1))
    with pytest.raises(MlflowException, match=r"shape \[N, 5\]: 4 noise values, then the digit"):
        predictor.predict(None, np.zeros((2, 4), np.float32))


def test_an_unconditional_pyfunc_refuses_a_digit():
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="vae is not a conditional model and takes no digit"):
        pyfunc_for(build_model(tiny("vae"))).predict(None, np.zeros((1, 4), np.float32), params={"digit": 7, "count": 2})


@pytest.mark.slow
def test_the_logged_conditional_model_takes_a_digit_through_mlflow(tmp_path):
    """The train stage logs a tiny cwgan; loaded through mlflow.pyfunc and served by `mlflow models serve`, it takes a
    `digit`, and a digit outside 0-9 is refused (a 4xx over HTTP, naming the problem)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    write_prepared(tmp_path / "data" / "prepared")
    write_params(
        tmp_path,
        train={
            "grade": "default",
            "seed": 0,
            "device": "cpu",
            "deterministic": True,
            "experiment": "test-exp",
            "sample_every": 1,
            "dist_timeout_s": 60,
        },
        models={"cwgan": tiny_model_params("cwgan")},
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mnistgen.stages.train",
            "cwgan",
            "--data",
            "data/prepared",
            "--out",
            "models/cwgan",
            "--curves",
            "curves/cwgan",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    model_uri = json.loads((tmp_path / "models" / "cwgan" / "run.json").read_text())["model_uri"]
    model = mlflow.pyfunc.load_model(model_uri)
    assert model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] in ([-1, 5], (-1, 5))
    assert "digit" in [p.name for p in model.metadata.signature.params.params]
    assert model.predict(np.zeros((1, 5), np.float32), params={"digit": 7, "count": 16}).shape == (16, 28, 28)
    with pytest.raises(MlflowException, match="digit must be an integer 0-9, got 10"):
        model.predict(np.zeros((1, 5), np.float32), params={"digit": 10, "count": 16})

    # The same model behind `mlflow models serve`: a digit over HTTP, and a bad one refused with a 4xx that names it.
    with served_model(model_uri, env) as port:
        status, body = post_invocation(port, {"inputs": [[0.0] * 5], "params": {"digit": 7, "count": 16}})
        assert status == 200, body
        assert np.asarray(json.loads(body)["predictions"]).shape == (16, 28, 28)
        status, body = post_invocation(port, {"inputs": [[0.0] * 4 + [3.0]]})  # explicit noise, then the digit
        assert status == 200 and np.asarray(json.loads(body)["predictions"]).shape == (1, 28, 28)
        for bad, names in (
            ({"params": {"digit": 10, "count": 4}}, "digit must be an integer 0-9, got 10"),
            ({"params": {"digit": -1, "count": 4}}, "digit must be an integer 0-9, got -1"),
            ({}, "digit column (the last) must hold integers 0-9, got 12"),
        ):
            inputs = [[0.0] * 4 + [12.0]] if not bad else [[0.0] * 5]
            status, body = post_invocation(port, {"inputs": inputs, **bad})
            assert 400 <= status < 500 and names in json.loads(body)["message"], (bad, status, body)
