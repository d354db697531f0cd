"""benchmarks/compare_seeds.py: which way is worse for each figure, and its exit status."""

import json
import subprocess
import sys

from helpers import ROOT


def summary(folder, model, protocol="p1", **means):
    """A `mnistgen seeds` summary with the given validation means, each with sd 1."""
    spread = {key: {"mean": mean, "sd": 1.0, "min": mean, "max": mean} for key, mean in means.items()}
    folder.mkdir(exist_ok=True)
    (folder / f"{model}.json").write_text(json.dumps({"protocol": protocol, "spread": {"val": spread, "test": spread}}))


def compare(a, b):
    return subprocess.run(
        [sys.executable, "benchmarks/compare_seeds.py", str(a), str(b)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_a_figure_worse_by_more_than_one_sd_fails_in_either_direction(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    summary(a, "cwgan", fid_cls=1.0, label_fidelity=0.97, recall=0.75)
    summary(b, "cwgan", fid_cls=1.5, label_fidelity=0.97, recall=0.75)  # FID up half an sd: not worse by one
    assert compare(a, b).returncode == 0
    summary(b, "cwgan", fid_cls=0.1, label_fidelity=-0.2, recall=0.75)  # FID better; label fidelity lower: worse
    result = compare(a, b)
    assert result.returncode == 1 and "worse by more than one sd: cwgan label_fidelity" in result.stdout
    summary(b, "cwgan", fid_cls=2.2, label_fidelity=0.97, recall=0.75)
    assert "worse by more than one sd: cwgan fid_cls" in compare(a, b).stdout


def test_two_protocols_are_not_compared(tmp_path):
    summary(tmp_path / "a", "gan", fid_cls=1.0)
    summary(tmp_path / "b", "gan", protocol="p2", fid_cls=1.0)
    result = compare(tmp_path / "a", tmp_path / "b")
    assert result.returncode == 2 and "different protocols" in result.stderr
