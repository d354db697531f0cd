"""The MLflow UI in a real headless Chromium, showing the runs the project's own stages log.

Runs the real stage scripts on tiny synthetic data (train.py for a VAE and a GAN, reference.py,
evaluate.py for the VAE) into a temp SQLite store, starts `mlflow server` on it, and loads pages of
the single-page app with `chromium --headless --dump-dom --screenshot` (the DOM only holds the
tables after the app's JavaScript has fetched them, hence the virtual-time budget). It checks:
the experiment opens on its training runs and lists the project's runs by name; each run's page
shows exactly the params its family logged (the GAN no VAE-only `model.beta`) and the metrics the
stages logged (`eval_*` from evaluate); an image the stage logged is served and shown. The
screenshots are kept as CI artifacts in artifacts/mlflow-ui*.png. Skipped where no chromium
binary is installed (CI installs the Debian `chromium` package in .ci/run).
"""

import os
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers import (
    ROOT,
    TINY_PINNED,
    chromium_binary,
    free_port,
    headless_chromium,
    pin_tiny_evaluators,
    tiny_evaluation_sections,
    tiny_model_params,
    write_params,
    write_prepared,
)
from mlflow import MlflowClient

EXPERIMENT = "mnist-generative"
TRAINED = ("vae", "gan")  # two families with different params; the VAE is evaluated too
LOOSE_GATE = {  # tiny models on synthetic digits: a floor every one meets, so promote registers them
    "primary": "fid_cls",
    "higher_is_better": False,
    "agree_in_both_spaces": True,
    "floors": [{"metric": "fid_cls", "max": 1e6}],
}
GATE_SETTINGS = {"alpha": 0.05, "bootstrap": 200, "bootstrap_seed": 0}
SAMPLE = "samples/samples_epoch_001.png"  # the fixed-noise grid train.py logs after epoch 1
ARTIFACTS = ROOT / "artifacts"
WINDOW = (1400, 900)
RUN_WINDOW = (1400, 1400)
ML_VIEW = "workflowType=machine_learning"  # MLflow 3.17's GenAI / Model training switch, as a URL parameter


def _run_stages(work: Path, db_uri: str) -> None:
    """The project's own stages, as dvc.yaml runs them, on 256 synthetic training images."""
    write_prepared(work / "data" / "prepared")
    write_params(
        work,
        train={
            "grade": "default",
            "seed": 0,
            "device": "cpu",
            "deterministic": False,
            "experiment": EXPERIMENT,
            "sample_every": 1,
            "dist_timeout_s": 60,
        },
        models={m: tiny_model_params(m) for m in TRAINED},
        gate={**GATE_SETTINGS, **dict.fromkeys(TRAINED, LOOSE_GATE)},
        **tiny_evaluation_sections(),
    )
    stages = [["train", m, "--data", "data/prepared", "--out", f"models/{m}", "--curves", f"curves/{m}"] for m in TRAINED]
    pin_tiny_evaluators(work)
    stages.append(
        [
            "reference",
            "--data",
            "data/prepared",
            "--evaluators",
            TINY_PINNED,
            "--out",
            "models/evaluator",
            "--metrics",
            "metrics/evaluator.json",
        ]
    )
    for m in TRAINED:
        stages.append(
            [
                *("evaluate", m, "--data", "data/prepared", "--evaluator", "models/evaluator"),
                *("--model-dir", f"models/{m}", "--figures", f"evaluation/{m}", "--metrics", "metrics"),
            ]
        )
    stages.append(  # registers both, each version with its model card as description
        [
            *("promote", "--metrics", "metrics/val", "--models", "models", "--evaluation", "evaluation"),
            *("--evaluator", "models/evaluator", "--data", "data/prepared", "--seeds", "metrics/seeds", "--out", "reports"),
        ]
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": db_uri}
    for stage, *args in stages:
        result = subprocess.run(
            [sys.executable, "-m", f"mnistgen.stages.{stage}", *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"{stage} {' '.join(args)} failed:\n{result.stderr[-3000:]}"


class _Page(HTMLParser):
    """The rendered DOM: (text, href) of every <a>, the visible text nodes (no script/style), (alt, src) of every <img>."""

    def __init__(self, dom: str):
        super().__init__()
        self.links, self.texts, self.images, self._open, self._skip = [], [], [], [], 0
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "a":
            self._open.append([attrs.get("href") or "", ""])
        elif tag == "img":
            self.images.append((attrs.get("alt") or "", attrs.get("src") or ""))

    def handle_data(self, data):
        if self._skip:
            return
        if data.strip():
            self.texts.append(" ".join(data.split()))
        for link in self._open:
            link[1] += data

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag == "a" and self._open:
            href, text = self._open.pop()
            self.links.append((" ".join(text.split()), href))

    def summary(self) -> str:
        return " | ".join(self.texts)[:2000]


def _start_server(db_uri: str, port: int, workdir: Path) -> tuple[subprocess.Popen, Path]:
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": str(bin_dir) + os.pathsep + os.environ.get("PATH", ""),  # mlflow starts uvicorn from PATH
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no huey job-runner processes: faster start, clean stop
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    log = workdir / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(bin_dir / "mlflow"),
                "server",
                "--backend-store-uri",
                db_uri,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, log


def _wait_healthy(proc: subprocess.Popen, log: Path, base: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {timeout:.0f}s:\n{log.read_text(errors='replace')[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's whole process group (mlflow CLI + uvicorn worker), SIGKILL if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # any straggler in the group
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _render(url: str, profile: Path, screenshot: Path, window: tuple[int, int], ready) -> _Page:
    """Headless Chromium passes with growing virtual-time budgets until `ready(page)`; writes the screenshot."""
    screenshot.unlink(missing_ok=True)
    for attempt, budget_ms in enumerate((20_000, 40_000, 60_000)):
        page = _Page(headless_chromium(url, Path(f"{profile}-{attempt}"), budget_ms, window, screenshot))
        if ready(page):  # the app has fetched and rendered what we look for
            break
    assert screenshot.exists() and screenshot.stat().st_size > 10_000, f"no real screenshot at {screenshot}"
    assert _png_size(screenshot) == window
    return page


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _param_names(page: _Page) -> set[str]:
    # every params section's key, and the one param a run with a moving average adds (train.py)
    return {t for t in page.texts if re.fullmatch(r"(model|train)\.[a-z_]+|ema_effective_decay", t)}


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.timeout(300)
def test_mlflow_ui_shows_the_projects_own_runs(tmp_path):
    chromium_binary()  # skips the test where there is none

    db_uri = f"sqlite:///{tmp_path}/mlflow.db"
    _run_stages(tmp_path, db_uri)
    client = MlflowClient(tracking_uri=db_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(TRAINED)
    exp_id, ids = experiment.experiment_id, {name: r.info.run_id for name, r in runs.items()}

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    run_link = re.compile(rf"^#/experiments/{exp_id}/runs/([0-9a-f]{{32}})$")

    def listed(page: _Page) -> set[tuple[str, str]]:
        return {(text, m.group(1)) for text, href in page.links if (m := run_link.match(href))}

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    proc, log = _start_server(db_uri, port, tmp_path)
    try:
        _wait_healthy(proc, log, base)
        experiment_page = _render(
            f"{base}/#/experiments/{exp_id}?{ML_VIEW}",
            tmp_path / "profile-experiment",
            ARTIFACTS / "mlflow-ui.png",
            WINDOW,
            lambda p: listed(p),
        )
        run_pages = {
            name: _render(
                f"{base}/#/experiments/{exp_id}/runs/{ids[name]}?{ML_VIEW}",
                tmp_path / f"profile-{name}",
                ARTIFACTS / f"mlflow-ui-run-{name}.png",
                RUN_WINDOW,
                lambda p: _param_names(p),
            )
            for name in TRAINED
        }
        version_page = _render(
            f"{base}/#/models/mnist-vae/versions/1",
            tmp_path / "profile-version",
            ARTIFACTS / "mlflow-ui-model-card.png",
            RUN_WINDOW,
            lambda p: any("mnist-vae v1: VAE, experiment grade" in t for t in p.texts),
        )
        artifact_page = _render(
            f"{base}/#/experiments/{exp_id}/runs/{ids['gan']}/artifacts/{SAMPLE}?{ML_VIEW}",
            tmp_path / "profile-artifact",
            ARTIFACTS / "mlflow-ui-artifact.png",
            WINDOW,
            lambda p: any(alt == SAMPLE for alt, _ in p.images),
        )
    finally:
        _stop(proc)

    # (a) the experiment opens on its training runs and lists the project's runs by their names
    assert listed(experiment_page) == set(ids.items()), (
        f"runs table links {sorted(listed(experiment_page))} != the stages' runs {sorted(ids.items())}; page: {experiment_page.summary()}"
    )
    assert EXPERIMENT in experiment_page.texts, "experiment name not shown on the page"
    assert "Runs" in experiment_page.texts and "Judges" not in experiment_page.texts  # the training view, not the GenAI one

    # (b) each run shows exactly the params its own family logged, and the stages' metrics
    for name, page in run_pages.items():
        assert _param_names(page) == set(runs[name].data.params), (
            f"{name}: params shown {sorted(_param_names(page))}; page: {page.summary()}"
        )
        assert {"model.family", "model.latent_dim", "train.seed"} <= _param_names(page)
    assert "model.beta" in run_pages["vae"].texts and "model.dynamic_binarization" in run_pages["vae"].texts
    assert "model.beta" not in run_pages["gan"].texts and "model.betas" in run_pages["gan"].texts  # VAE-only params absent
    assert {"val_loss", "kl", "test_fid_cls", "val_iwae_nll"} <= set(run_pages["vae"].texts)
    assert {"g_loss", "d_loss", "val_g_loss", "val_fid_cls"} <= set(run_pages["gan"].texts)
    assert not {"kl", "val_iwae_nll"} & set(run_pages["gan"].texts)  # a GAN has no likelihood

    # (d) the version's page shows its model card: what it is, its protocol and what the gate decided
    card = client.get_model_version("mnist-vae", "1").description
    shown = " ".join(version_page.texts)
    # the tiny recipe claims `default` but is not the committed default: it earns `experiment` (mnistgen.grades)
    assert any("mnist-vae v1: VAE, experiment grade" in t for t in version_page.texts), version_page.summary()
    assert "claimed default" in card
    for part in ("Data and protocol", "Headline metrics (validation)", "Known limits", "no champion yet"):
        assert part in card and part in shown, part

    # (c) the sample grid the train stage logged is listed and shown (fetched by the app as a blob)
    assert "samples" in artifact_page.texts and "figures" in artifact_page.texts
    assert any(alt == SAMPLE and src.startswith("blob:") for alt, src in artifact_page.images), (
        f"{SAMPLE} not shown: images {artifact_page.images[:5]}; page: {artifact_page.summary()}"
    )
