"""The MLflow UI in a real headless Chromium: a tracking server over a fresh SQLite store must list the runs.

Fills a temp SQLite store with the experiment "mnist-generative" and four finished runs (ae, vae, gan,
wgan) plus one deleted run, starts `mlflow server` on a free local port, loads the experiment's runs
page (a single-page app, so the table only exists after its JavaScript has fetched the runs) with
`chromium --headless --dump-dom --screenshot`, and checks the rendered DOM: exactly the four run-name
links, each pointing at its own run id, the experiment name shown, the deleted run absent. The
screenshot is kept as a CI artifact in artifacts/mlflow-ui.png. Skipped where no chromium binary is
installed (CI installs the Debian `chromium` package in .ci/run).
"""
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import ROOT

EXPERIMENT = "mnist-generative"
MODELS = ("ae", "vae", "gan", "wgan")
DELETED_RUN = "dcgan-deleted"  # logged, then deleted: the UI must not list it
SCREENSHOT = ROOT / "artifacts" / "mlflow-ui.png"
WINDOW = (1400, 900)


def _chromium() -> str | None:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill_store(tracking_uri: str, artifacts: Path) -> tuple[str, dict[str, str]]:
    """Experiment + four finished runs with params and per-epoch metrics; returns (experiment id, name -> run id)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=artifacts.as_uri())
    run_ids = {}
    now = int(time.time() * 1000)
    for i, name in enumerate((*MODELS, DELETED_RUN)):
        run = client.create_run(experiment_id, run_name=name, start_time=now - 60_000 + i * 1000)
        run_id = run.info.run_id
        params = [Param("model.family", name), Param("train.epochs", "3"),
                  Param("train.lr", "0.001"), Param("model.latent_dim", "16")]
        metrics = []
        for epoch in range(3):
            loss = 1.0 / (epoch + 1) + 0.1 * i
            metrics += [Metric("train_loss", loss, now + epoch, epoch),
                        Metric("val_loss", loss * 1.1, now + epoch, epoch)]
        client.log_batch(run_id, metrics=metrics, params=params)
        client.set_terminated(run_id, "FINISHED", end_time=now - 30_000 + i * 1000)
        run_ids[name] = run_id
    client.delete_run(run_ids.pop(DELETED_RUN))
    return experiment_id, run_ids


class _Links(HTMLParser):
    """(text, href) of every <a> in a document (text whitespace-collapsed); the visible text nodes (no script/style)."""

    def __init__(self):
        super().__init__()
        self.links, self.texts, self._open, self._skip = [], [], [], 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "a":
            self._open.append([dict(attrs).get("href") or "", ""])

    def handle_data(self, data):
        if self._skip:
            return
        self.texts.append(data)
        for link in self._open:
            link[1] += data

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag == "a" and self._open:
            href, text = self._open.pop()
            self.links.append((" ".join(text.split()), href))


def _start_server(db_uri: str, port: int, workdir: Path) -> tuple[subprocess.Popen, Path]:
    bin_dir = Path(sys.executable).parent
    mlflow_exe = bin_dir / "mlflow"
    env = {**os.environ,
           "PATH": str(bin_dir) + os.pathsep + os.environ.get("PATH", ""),  # mlflow starts uvicorn from PATH
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no huey job-runner processes: faster start, clean stop
           "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = workdir / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(mlflow_exe), "server", "--backend-store-uri", db_uri,
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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


def _render(chromium: str, url: str, profile: Path, screenshot: Path, budget_ms: int) -> str:
    """One headless Chromium pass: returns the DOM after `budget_ms` of virtual time and writes the screenshot."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--mute-audio", "--hide-scrollbars",
           f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={screenshot}", "--dump-dom", url]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"chromium failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return result.stdout


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.timeout(300)
def test_mlflow_ui_lists_the_four_model_runs(tmp_path, monkeypatch):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium binary (install the Debian package: apt-get install -y chromium)")

    db_uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db_uri)
    experiment_id, run_ids = _fill_store(db_uri, tmp_path / "mlartifacts")

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc, log = _start_server(db_uri, port, tmp_path)
    try:
        _wait_healthy(proc, log, base)
        url = f"{base}/#/experiments/{experiment_id}/runs"  # the runs table (plain /#/experiments/<id> is the GenAI overview)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.unlink(missing_ok=True)
        link = re.compile(rf"^#/experiments/{experiment_id}/runs/([0-9a-f]{{32}})$")
        for attempt, budget_ms in enumerate((20_000, 40_000, 60_000)):
            dom = _render(chromium, url, tmp_path / f"chromium-profile-{attempt}", SCREENSHOT, budget_ms)
            parser = _Links()
            parser.feed(dom)
            listed = {(text, m.group(1)) for text, href in parser.links if (m := link.match(href))}
            if listed:  # the SPA fetched and rendered the runs table
                break
    finally:
        _stop(proc)

    assert listed == {(name, run_id) for name, run_id in run_ids.items()}, (
        f"runs table links {sorted(listed)} != the four logged runs {sorted(run_ids.items())}; "
        f"page text: {' '.join(' '.join(parser.texts).split())[:2000]}")
    texts = {" ".join(t.split()) for t in parser.texts}
    assert EXPERIMENT in texts, "experiment name not shown on the page"
    assert DELETED_RUN not in dom, "a deleted run is listed"

    assert SCREENSHOT.exists(), "chromium wrote no screenshot"
    assert SCREENSHOT.stat().st_size > 10_000, f"screenshot only {SCREENSHOT.stat().st_size} bytes"
    assert _png_size(SCREENSHOT) == WINDOW
