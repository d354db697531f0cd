"""Each split has one role: validation chooses, test is read only by the final report.

What chooses is the gate (the promote stage), the sweep and the quality benchmark. Here: the pipeline's
map gives the promote stage validation inputs only and the report the test metrics; no module that
chooses names the test split or the test metrics anywhere in its code. The behaviour itself is
checked where each chooser runs: the sweep and the quality benchmark run on prepared data with no
test split at all (test_sweep, test_benchmarks), and so does a promotion that re-measures a champion
(test_registry).
"""

import ast

import pytest
import torch
import yaml
from helpers import ROOT, write_prepared

from mnistgen import data, evaluation

CHOOSERS = [
    "src/mnistgen/gate.py",
    "src/mnistgen/comparison.py",
    "src/mnistgen/promotion.py",
    "src/mnistgen/stages/promote.py",
    "src/mnistgen/sweep.py",
    "benchmarks/quality_at_fixed_clock.py",
]


def stage(name: str) -> dict:
    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]
    return raw.get("do", raw)


def strings(path: str) -> list[str]:
    """Every string literal of a module's code (docstrings and comments are not code)."""
    tree = ast.parse((ROOT / path).read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    ]


def test_the_gate_stage_depends_on_validation_and_the_report_on_test():
    promote, report, evaluate = stage("promote"), stage("report"), stage("evaluate")
    assert "metrics/val" in promote["deps"] and "--metrics metrics/val" in promote["cmd"]
    assert not any(d == "metrics" or d.startswith("metrics/test") for d in promote["deps"])
    assert "metrics/test" in report["deps"] and not any(d.startswith("metrics/val") for d in report["deps"])
    written = [next(iter(m)) for m in evaluate["metrics"]]
    assert written == ["metrics/val/${key}.json", "metrics/test/${key}.json"]


def test_no_code_that_chooses_names_the_test_split():
    for path in CHOOSERS:
        named = [s for s in strings(path) if s == "test" or "metrics/test" in s or s.startswith("test_") or "test.pt" in s]
        assert not named, f"{path} names the test split or its metrics: {named}"


def test_the_check_sees_a_chooser_that_reads_test(tmp_path, monkeypatch):
    """The scan is not blind: a line that loads the test split is caught, a docstring that mentions it is not."""
    bad = tmp_path / "bad.py"
    bad.write_text('"""Doc mentions test."""\nfrom mnistgen import data\nsplit = data.load_split("data/prepared", "test")\n')
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert strings("bad.py") == ["data/prepared", "test"]


def test_reading_the_test_split_outside_a_reporting_role_raises(tmp_path):
    """At run time too: the test split's images and its references load only inside data.reading_test."""
    write_prepared(tmp_path / "prepared", n_train=16, n_val=8, n_test=8)
    assert len(data.load_split(tmp_path / "prepared", "val").labels) == 8
    with pytest.raises(data.SplitRefused, match="the test split is read only to report"):
        data.load_split(tmp_path / "prepared", "test")
    with pytest.raises(data.SplitRefused):
        evaluation.load_references(tmp_path / "no-such-folder", "test")  # refused before any file is opened
    with data.reading_test("report"):
        assert isinstance(data.load_split(tmp_path / "prepared", "test").images, torch.Tensor)
    with pytest.raises(data.SplitRefused):  # the permission ends with the block
        data.load_split(tmp_path / "prepared", "test")
    with pytest.raises(ValueError, match="does not read the test split"), data.reading_test("sweep"):
        pass
