"""End to end: `dvc repro` on a small real-MNIST subset (params-smoke.yaml) with a real MLflow SQLite store."""

import json

import pytest
import torch
import yaml
from helpers import ROOT

from mnistgen.commands import smoke as smoke_pipeline
from mnistgen.config import model_names
from mnistgen.models import FAMILIES, load_model_params

MODELS = model_names(ROOT / "params.yaml")
CONDITIONAL = [m for m in MODELS if FAMILIES[load_model_params(m, ROOT / "params.yaml").family].conditional]
pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, mnist_mirror):
    work = smoke_pipeline.make_workspace(tmp_path_factory.mktemp("e2e"), ROOT / "params-smoke.yaml")
    result = smoke_pipeline.dvc("repro", cwd=work, capture=True)
    if (work / "reports" / "promotion.md").exists():  # the gate's decision: CI's summary, kept with its artifacts
        (ROOT / "artifacts").mkdir(exist_ok=True)
        (ROOT / "artifacts" / "promotion.md").write_text((work / "reports" / "promotion.md").read_text())
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]  # a gate regression (promote exit 1) fails CI
    return work, result.stdout


def test_every_stage_ran_and_printed_its_summary(pipeline):
    work, stdout = pipeline
    for line in (
        "prepare: train 5000, val 1000, test 2000",
        "validation passed",
        "reference: pinned evaluators v1",
        *(f"train {m}: " for m in MODELS),
        *(f"evaluate {m} on {split}: FID_cls" for m in MODELS for split in ("val", "test")),
        "report:",
        "promote: exit 0",
    ):
        assert line in stdout, line
    assert json.loads((work / "data/validation/result.json").read_text())["success"] is True


# What a working pipeline reaches on the smoke subset (5,000 training images, 2,000 samples against
# 2,000 test images), measured with the pinned evaluators (evaluators/v1), with a margin of about 1.5x
# below what this commit's smoke run measured (FID_cls / FID_cls evaluator 2 / IS_cls / precision / recall:
# AE 18.0 / 30.2 / 5.28 / 0.61 / 0.44, VAE 21.8 / 33.5 / 4.75 / 0.66 / 0.45, GAN 14.8 / 15.7 / 5.96 / 0.37 / 0.56,
# WGAN 33.1 / 34.6 / 4.03 / 0.42 / 0.16, CVAE 6.4 / 15.2 / 9.20 / 0.89 / 0.25, CWGAN 17.4 / 23.4 / 6.48 / 0.59 / 0.21);
# a model that learned nothing, or an evaluator that broke, misses them by far.
REACHES = {  # model: (FID_cls max, FID_cls evaluator 2 max, IS_cls min, precision min, recall min)
    "ae": (30.0, 50.0, 3.5, 0.4, 0.25),
    "vae": (35.0, 55.0, 3.0, 0.4, 0.25),
    "gan": (25.0, 25.0, 4.0, 0.25, 0.35),
    "wgan": (50.0, 55.0, 2.7, 0.28, 0.08),
    # the conditional models on a label-balanced mix
    "cvae": (10.0, 25.0, 6.0, 0.6, 0.15),
    "cwgan": (28.0, 38.0, 4.3, 0.4, 0.12),
}
BANDED = [f"{m}{s}" for m in ("fid_cls", "kid_cls", "precision", "recall") for s in ("", "_e2")]


def test_metrics_follow_the_protocol(pipeline):
    work, _ = pipeline
    evaluator = json.loads((work / "metrics/evaluator.json").read_text())
    real = json.loads((work / "reports/real_data.json").read_text())
    from mnistgen.utils import sha256_file

    # the pinned ruler, not one retrained on the subset: the very weights in git
    assert (
        evaluator["evaluator_hash"]
        == sha256_file(work / "models/evaluator/classifier.pt")
        == sha256_file(ROOT / "evaluators/v1/classifier.pt")
    )
    assert evaluator["evaluator_hash_e2"] == sha256_file(ROOT / "evaluators/v1/classifier2.pt") != evaluator["evaluator_hash"]
    assert evaluator["val_accuracy"] >= 0.97 and evaluator["val_accuracy_e2"] >= 0.97
    assert real["fid_cls"] < 3.0 and real["fid_cls_e2"] < 3.0 and real["precision"] > 0.6 and real["recall"] > 0.6
    assert real["is_cls"] > 8.0 and real["classes_present"] == 10
    for model in MODELS:
        m = json.loads((work / f"metrics/test/{model}.json").read_text())
        val = json.loads((work / f"metrics/val/{model}.json").read_text())
        assert (m["split"], val["split"]) == ("test", "val") and m["protocol"] != val["protocol"]
        assert m["evaluator_hash"] == evaluator["evaluator_hash"] and m["evaluator_hash_e2"] == evaluator["evaluator_hash_e2"]
        for key in (
            "fid_cls",
            "kid_cls",
            "is_cls",
            "precision",
            "recall",
            "classes_present",
            "interp_linear_confidence",
            "interp_linear_fid_cls",
            "interp_linear_fid_cls_e2",
            "grad_mag",
            "laplacian_var",
            "grey_fraction",
        ):
            assert key in m, (model, key)
        for key in BANDED:
            assert m[f"{key}_lo"] <= m[key] <= m[f"{key}_hi"] and m[f"{key}_hi"] > m[f"{key}_lo"], (model, key)
        fid_max, fid2_max, is_min, precision_min, recall_min = REACHES[model]
        assert m["fid_cls"] < fid_max and m["fid_cls_e2"] < fid2_max, (model, m["fid_cls"], m["fid_cls_e2"])
        assert m["is_cls"] > is_min and m["precision"] > precision_min and m["recall"] >= recall_min, (model, m)
        assert m["fid_cls"] > 2 * real["fid_cls"] and m["classes_present"] >= 9, (model, m["fid_cls"], real["fid_cls"])
        assert 0.5 * real["grad_mag"] < m["grad_mag"] < 2 * real["grad_mag"], (model, m["grad_mag"], real["grad_mag"])
    vae = json.loads((work / "metrics/test/vae.json").read_text())
    assert vae["iwae_nll"] <= vae["nelbo_binarized"] + 1.0  # the IWAE bound is the tighter one
    assert vae["iwae_nll"] < 130.0 and vae["recon_mse"] < 0.03
    assert vae["likelihood_images"] == vae["iwae_images"] == 250  # params-smoke: 250 of 2,000, not a multiple of the chunk
    assert vae["grey_fraction"] > real["grey_fraction"]  # a likelihood-trained decoder's mean is blurry
    assert "recon_mse" in json.loads((work / "metrics/test/ae.json").read_text()) and "recon_mse" not in json.loads(
        (work / "metrics/test/gan.json").read_text()
    )
    # -log p(x) = -log p(x | y) + log 10 + log p(y | x) <= -log p(x | y) + 2.303: the CVAE's marginal bound can exceed its
    # bound given the digit by at most log 10, plus the two estimates' own sampling noise (k = 100 here)
    cvae = json.loads((work / "metrics/test/cvae.json").read_text())
    assert cvae["iwae_nll"] < cvae["iwae_nll_given_label"] + 2.303 + 0.3, cvae
    for figure in ("samples.png", "interpolation_linear.png", "class_histogram.png"):
        assert (work / "evaluation/gan" / figure).stat().st_size > 1000
    for figure in ("reconstructions.png", "latent_scatter.png"):
        assert (work / "evaluation/vae" / figure).stat().st_size > 1000
    for model in CONDITIONAL:  # asked for each digit, they give it: far above the 0.1 of a label-ignoring model
        m = json.loads((work / f"metrics/test/{model}.json").read_text())
        assert m["label_fidelity"] > 0.5, (model, m["label_fidelity"])
        per_digit = [m[f"fid_cls_digit_{d}"] for d in range(10)]  # each digit's samples against that digit's test images
        assert m["fid_cls_per_class_mean"] == pytest.approx(sum(per_digit) / 10) and max(per_digit) < 100, (model, per_digit)
        for figure in ("digit_grid.png", "samples_by_class.png"):
            assert (work / "evaluation" / model / figure).stat().st_size > 1000
    assert "latent_silhouette" in cvae
    assert "label fidelity" in (work / "reports/comparison.md").read_text()
    html = (work / "reports/comparison.html").read_text()
    assert 'id="comparison"' in html and "data:image/png;base64," in html
    page = (work / "reports/comparison.md").read_text()
    assert "Kendall tau" in page and "FID_cls, evaluator 2" in page and "sharpness: gradient magnitude" in page
    assert page.count("evaluator 1") >= 3 and "same 250 test images" in page


def test_mlflow_holds_a_run_and_a_champion_per_model(pipeline):
    work, _ = pipeline
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db", registry_uri=f"sqlite:///{work}/mlflow.db")
    experiment = client.get_experiment_by_name("mnist-generative")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(MODELS)
    for name, run in runs.items():
        assert {"test_fid_cls", "test_fid_cls_lo", "val_fid_cls_e2_hi", "val_grad_mag"} <= set(run.data.metrics)
        assert run.data.tags["evaluator_hash"] and run.data.tags["evaluator_hash_e2"] and run.data.tags["grade"] == "smoke"
        # where the seconds went: each part of the evaluation per split, inside the stage's total; and on what CPU
        parts = {k: v for k, v in run.data.metrics.items() if k.startswith("eval_seconds_")}
        expected = {"samples", "interpolation"} | ({"likelihood"} if name in ("vae", "cvae") else set())
        assert {f"eval_seconds_{split}_{part}" for split in ("val", "test") for part in expected} <= set(parts), parts
        assert all(v > 0 for v in parts.values()) and sum(parts.values()) < run.data.metrics["eval_seconds"]
        assert run.data.tags["cpu"] and int(run.data.tags["torch_threads"]) >= 1
        champion = client.get_model_version_by_alias(f"mnist-{name}", "champion")  # a local store: smoke may be champion
        assert champion.run_id == run.info.run_id and champion.tags["protocol"] == run.data.tags["protocol"]
        assert float(champion.tags["metric.fid_cls"]) == pytest.approx(run.data.metrics["val_fid_cls"])  # chosen on validation
        assert f"mnist-{name} v{champion.version}: " in champion.description
    assert json.loads((work / "reports/promotion.json").read_text())["exit_code"] == 0


def test_second_repro_does_nothing_and_dvc_shows_metrics_and_plots(pipeline):
    work, _ = pipeline
    again = smoke_pipeline.dvc("repro", cwd=work, capture=True)
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout
    shown = smoke_pipeline.dvc("metrics", "show", cwd=work, capture=True)
    assert "metrics/test/vae.json" in shown.stdout and "metrics/val/vae.json" in shown.stdout and "iwae_nll" in shown.stdout
    plots = smoke_pipeline.dvc("plots", "show", "-o", "plots_out", cwd=work, capture=True)
    assert plots.returncode == 0, plots.stderr
    page = (work / "plots_out" / "index.html").read_text()
    for curve in (
        "curves/ae/loss.csv",
        "curves/vae/kl.csv",
        "curves/gan/d_loss.csv",
        "curves/wgan/grad_norm.csv",
        "curves/wgan/curves.png",
    ):
        assert curve.replace("/", "_").replace(".", "_") in page, curve
    assert "cdn.jsdelivr" not in page and "<script src" not in page  # the offline template (.dvc/config plots.html_template)


def test_fid_sanity_real_data_is_far_below_noise_and_a_broken_generator(pipeline):
    """FID_cls of real training images is far below that of noise images and of an untrained generator (against the
    validation images: a check of the ruler reads no test figure)."""
    work, _ = pipeline
    from mnistgen import evaluation, metrics
    from mnistgen.evaluators import Classifier
    from mnistgen.models import build_model

    classifier = Classifier()  # the first evaluator: the default architecture
    classifier.load_state_dict(torch.load(work / "models/evaluator/classifier.pt", weights_only=True))
    classifier.eval()
    ref = evaluation.load_references(work / "models/evaluator", "val")[""]
    real = metrics.fid(ref.train_feats, ref.feats)
    noise = metrics.fid(
        classifier.features_and_probs(torch.rand(2000, 1, 28, 28, generator=torch.Generator().manual_seed(0)))[0], ref.feats
    )
    torch.manual_seed(0)
    broken = build_model(load_model_params("gan", work / "params.yaml")).eval()  # untrained
    with torch.no_grad():
        broken_fid = metrics.fid(classifier.features_and_probs(broken.sample(2000))[0], ref.feats)
    assert real < 0.05 * noise and real < 0.05 * broken_fid, (real, noise, broken_fid)


def test_a_threshold_edit_that_still_passes_reruns_only_validate(pipeline):
    """The later stages depend on data/validated.json (the data's hashes), not on the report with its thresholds,
    ids and seconds: a looser threshold reruns validate and leaves every other stage up to date."""
    work, _ = pipeline
    params_file = work / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["validate"]["image_mean_min"] -= 0.1
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = smoke_pipeline.dvc("status", "--json", cwd=work, capture=True)
        assert set(json.loads(status.stdout)) == {"validate"}, status.stdout  # only its params changed
        rerun = smoke_pipeline.dvc("repro", cwd=work, capture=True)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        ran = [line for line in rerun.stdout.splitlines() if line.startswith("Running stage")]
        assert ran == ["Running stage 'validate':"], rerun.stdout
        assert json.loads(smoke_pipeline.dvc("status", "--json", cwd=work, capture=True).stdout) == {}
    finally:
        params_file.write_text(original)
        smoke_pipeline.dvc("repro", cwd=work, capture=True)
