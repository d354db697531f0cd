"""End to end: `dvc repro` on a small real-MNIST subset (params-smoke.yaml) with a real MLflow SQLite store."""
import json

import pytest
import torch

from helpers import ROOT, load_script

smoke_pipeline = load_script("scripts/smoke_pipeline.py")
MODELS = ("ae", "vae", "gan", "wgan", "cvae", "cwgan")
CONDITIONAL = ("cvae", "cwgan")
pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, mnist_mirror):
    work = smoke_pipeline.make_workspace(tmp_path_factory.mktemp("e2e"), ROOT / "params-smoke.yaml")
    result = smoke_pipeline.dvc("repro", cwd=work, capture=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return work, result.stdout


def test_every_stage_ran_and_printed_its_summary(pipeline):
    work, stdout = pipeline
    for line in ("prepare: train 5000, val 1000, test 2000", "validation passed", "train_evaluator: test accuracy",
                 *(f"train {m}: " for m in MODELS), *(f"evaluate {m}: FID_cls" for m in MODELS),
                 "report:", "promote: exit 0"):
        assert line in stdout, line
    assert json.loads((work / "data/validation/result.json").read_text())["success"] is True


def test_metrics_follow_the_protocol(pipeline):
    work, _ = pipeline
    evaluator = json.loads((work / "metrics/evaluator.json").read_text())
    real = json.loads((work / "reports/real_data.json").read_text())
    from mnistgen.utils import sha256_file

    assert evaluator["evaluator_hash"] == sha256_file(work / "models/evaluator/classifier.pt")
    for model in MODELS:
        m = json.loads((work / f"metrics/{model}.json").read_text())
        assert m["evaluator_hash"] == evaluator["evaluator_hash"]
        for key in ("fid_cls", "kid_cls", "is_cls", "precision", "recall", "classes_present", "interp_linear_confidence", "interp_linear_fid_cls"):
            assert key in m, (model, key)
        assert 1.0 <= m["is_cls"] <= 10.0 and 0 <= m["precision"] <= 1 and m["fid_cls"] > real["fid_cls"]
    vae = json.loads((work / "metrics/vae.json").read_text())
    assert vae["iwae_nll"] <= vae["nelbo_binarized"] + 1.0  # the IWAE bound is the tighter one
    assert "recon_mse" in json.loads((work / "metrics/ae.json").read_text()) and "recon_mse" not in json.loads((work / "metrics/gan.json").read_text())
    for figure in ("samples.png", "interpolation_linear.png", "class_histogram.png"):
        assert (work / "evaluation/gan" / figure).stat().st_size > 1000
    for figure in ("reconstructions.png", "latent_scatter.png"):
        assert (work / "evaluation/vae" / figure).stat().st_size > 1000
    for model in CONDITIONAL:  # asked for each digit, they give it: far above the 0.1 of a label-ignoring model
        m = json.loads((work / f"metrics/{model}.json").read_text())
        assert m["label_fidelity"] > 0.5 and m["fid_cls_per_class_mean"] > 0, (model, m["label_fidelity"])
        for figure in ("digit_grid.png", "samples_by_class.png"):
            assert (work / "evaluation" / model / figure).stat().st_size > 1000
    assert "latent_silhouette" in json.loads((work / "metrics/cvae.json").read_text())
    assert "label fidelity" in (work / "reports/comparison.md").read_text()
    html = (work / "reports/comparison.html").read_text()
    assert 'id="comparison"' in html and "data:image/png;base64," in html


def test_mlflow_holds_a_run_and_a_champion_per_model(pipeline):
    work, _ = pipeline
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db", registry_uri=f"sqlite:///{work}/mlflow.db")
    experiment = client.get_experiment_by_name("mnist-generative")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(MODELS)
    for name, run in runs.items():
        assert "eval_fid_cls" in run.data.metrics and "val_" + ("loss" if name in ("ae", "vae", "cvae") else "d_loss") in run.data.metrics
        assert run.data.tags["evaluator_hash"]
        champion = client.get_model_version_by_alias(f"mnist-{name}", "champion")
        assert champion.run_id == run.info.run_id
        assert float(champion.tags["metric.fid_cls"]) == pytest.approx(run.data.metrics["eval_fid_cls"])
    assert json.loads((work / "reports/promotion.json").read_text())["exit_code"] == 0


def test_second_repro_does_nothing_and_dvc_shows_metrics_and_plots(pipeline):
    work, _ = pipeline
    again = smoke_pipeline.dvc("repro", cwd=work, capture=True)
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout
    shown = smoke_pipeline.dvc("metrics", "show", cwd=work, capture=True)
    assert "metrics/vae.json" in shown.stdout and "iwae_nll" in shown.stdout
    plots = smoke_pipeline.dvc("plots", "show", "-o", "plots_out", cwd=work, capture=True)
    assert plots.returncode == 0, plots.stderr
    page = (work / "plots_out" / "index.html").read_text()
    for curve in ("curves/ae/loss.csv", "curves/vae/kl.csv", "curves/gan/d_loss.csv", "curves/wgan/grad_norm.csv", "curves/wgan/curves.png"):
        assert curve.replace("/", "_").replace(".", "_") in page, curve
    assert "cdn.jsdelivr" not in page and "<script src" not in page  # the offline template (.dvc/config plots.html_template)


def test_fid_sanity_real_data_is_far_below_noise_and_a_broken_generator(pipeline):
    """FID_cls of real training images is far below that of noise images and of an untrained generator."""
    work, _ = pipeline
    from mnistgen import evaluation, metrics
    from mnistgen.classifier import Classifier
    from mnistgen.config import load_model_params
    from mnistgen.models import build_model

    classifier = Classifier()
    classifier.load_state_dict(torch.load(work / "models/evaluator/classifier.pt", weights_only=True))
    classifier.eval()
    ref = evaluation.Reference(**torch.load(work / "models/evaluator/reference.pt", weights_only=True))
    real = metrics.fid(ref.train_feats, ref.test_feats)
    noise = metrics.fid(classifier.features_and_probs(torch.rand(2000, 1, 28, 28, generator=torch.Generator().manual_seed(0)))[0], ref.test_feats)
    torch.manual_seed(0)
    broken = build_model(load_model_params("gan", work / "params.yaml")).eval()  # untrained
    with torch.no_grad():
        broken_fid = metrics.fid(classifier.features_and_probs(broken.sample(2000))[0], ref.test_feats)
    assert real < 0.05 * noise and real < 0.05 * broken_fid, (real, noise, broken_fid)
