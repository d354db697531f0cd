"""Data validation (mnistgen.validation + pipelines/validate.py) on small synthetic splits.

Great Expectations is imported once (by the first `validate` call, in a module-scoped
fixture); every later call only builds a new ephemeral context.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from mnistgen import data, validation
from mnistgen.config import ValidateParams

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"train": 400, "val": 100, "test": 200}
PARAMS = ValidateParams()


def synthetic_split(n: int, seed: int, width: int = 28) -> data.Split:
    """Balanced labels (n/10 per class); random sparse strokes, mean intensity ~33 of 255."""
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(n, 28, width, generator=g) < 0.15
    values = torch.randint(128, 256, (n, 28, width), generator=g)
    images = (on * values).to(torch.uint8)
    labels = torch.arange(n, dtype=torch.int64) % 10
    return data.Split(images, labels)


def good_splits() -> dict[str, data.Split]:
    return {name: synthetic_split(n, seed) for seed, (name, n) in enumerate(SIZES.items())}


def failed_names(result: validation.ValidationResult) -> list[str]:
    return [c["name"] for c in result.failed]


def check(result: validation.ValidationResult, name: str) -> dict:
    return next(c for c in result.checks if c["name"] == name)


@pytest.fixture(scope="module")
def good_table() -> pd.DataFrame:
    return validation.image_table(good_splits())


@pytest.fixture(scope="module")
def good_result(good_table) -> validation.ValidationResult:
    return validation.validate(good_table, SIZES, PARAMS)  # imports GE (once per session)


def test_library_import_does_not_import_great_expectations():
    code = "import sys; import mnistgen.validation, mnistgen.data; print('great_expectations' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}, check=True)
    assert out.stdout.strip() == "False"


def test_image_table_columns(good_table):
    assert list(good_table.columns) == ["split", "label", "height", "width", "dtype", "min", "max", "mean", "hash"]
    assert len(good_table) == sum(SIZES.values())
    assert good_table.groupby("split").size().to_dict() == SIZES
    assert set(good_table["dtype"]) == {"uint8"} and set(good_table["height"]) == {28}
    split = good_splits()["val"]
    row = good_table[good_table["split"] == "val"].iloc[3]
    image = split.images[3]
    assert row["label"] == split.labels[3]
    assert row["min"] == image.min() and row["max"] == image.max()
    assert row["mean"] == pytest.approx(image.double().mean().item())
    assert good_table["hash"].nunique() == len(good_table)  # random images: all distinct


def test_good_data_passes(good_result):
    assert good_result.success, good_result.failure_lines()
    names = [c["name"] for c in good_result.checks]
    for split in SIZES:
        for check_name in ("labels in 0..9", "height == 28", "width == 28", "dtype uint8", "pixel min >= 0",
                           "pixel max <= 255", "image mean intensity", "row count", "split mean intensity"):
            assert f"{check_name} [{split}]" in names
    assert "class fractions" in names and "train/val vs test duplicates" in names
    assert check(good_result, "row count [val]")["observed"] == SIZES["val"]
    assert 25 < check(good_result, "split mean intensity [train]")["observed"] < 40
    assert good_result.counts["duplicates"]["train-test"]["shared"] == 0
    assert good_result.counts["class_fractions"]["train"]["3"] == pytest.approx(0.1)


def test_report_json_and_markdown(good_result):
    loaded = json.loads(good_result.to_json())
    assert loaded["success"] is True and len(loaded["checks"]) == len(good_result.checks)
    md = good_result.to_markdown()
    assert "PASSED" in md and "| class fractions | 0.08 <= fraction <= 0.12 | pass" in md
    assert "| train-test | 0 | 0 | 10 |" in md and "Failed expectations" not in md


def test_label_out_of_range_fails(good_table):
    table = good_table.copy()
    table.loc[table.index[table["split"] == "val"][0], "label"] = 11
    result = validation.validate(table, SIZES, PARAMS)
    assert failed_names(result) == ["labels in 0..9 [val]"]
    c = check(result, "labels in 0..9 [val]")
    assert c["observed"]["unexpected"] == 1 and c["observed"]["values"] == ["11"]
    assert c["failed"] == [f"val: 1 of {SIZES['val']} images, e.g. 11"]
    md = result.to_markdown()
    assert "**FAILED**" in md and "- **labels in 0..9 [val]** (expect_column_values_to_be_between)" in md


def test_wrong_shape_fails():
    splits = good_splits()
    splits["val"] = synthetic_split(SIZES["val"], seed=7, width=27)
    result = validation.validate(validation.image_table(splits), SIZES, PARAMS)
    assert failed_names(result) == ["width == 28 [val]"]
    assert check(result, "width == 28 [val]")["observed"] == {"unexpected": SIZES["val"], "of": SIZES["val"], "values": ["27"]}


def test_wrong_dtype_and_intensity_fail(good_table):
    table = good_table.copy()
    test_rows = table["split"] == "test"
    table.loc[test_rows, "dtype"] = "float32"
    table.loc[test_rows, "mean"] = table.loc[test_rows, "mean"] / 255.0  # images scaled to 0..1
    result = validation.validate(table, SIZES, PARAMS)
    failed = failed_names(result)
    assert failed == ["dtype uint8 [test]", "image mean intensity [test]", "split mean intensity [test]"]
    assert check(result, "dtype uint8 [test]")["observed"]["values"] == ["float32"]


def test_missing_class_fails():
    splits = good_splits()
    labels = splits["test"].labels.clone()
    labels[labels == 7] = 3
    splits["test"] = data.Split(splits["test"].images, labels)
    result = validation.validate(validation.image_table(splits), SIZES, PARAMS)
    assert failed_names(result) == ["class fractions"]
    failed = check(result, "class fractions")["failed"]
    assert "test/class 7: 0" in failed and "test/class 3: 0.2" in failed
    assert result.counts["class_fractions"]["test"]["7"] == 0.0
    assert any("test/class 7" in line for line in result.failure_lines())


def test_row_count_mismatch_fails(good_table):
    sizes = dict(SIZES, train=SIZES["train"] + 1)
    result = validation.validate(good_table, sizes, PARAMS)
    assert failed_names(result) == ["row count [train]"]
    c = check(result, "row count [train]")
    assert c["observed"] == SIZES["train"] and c["expected"] == {"value": SIZES["train"] + 1}
    assert c["failed"] == [f"train: {SIZES['train']}, expected rows == {SIZES['train'] + 1}"]


def test_missing_split_fails():
    splits = good_splits()
    del splits["val"]
    result = validation.validate(validation.image_table(splits), SIZES, PARAMS)
    failed = failed_names(result)
    assert {"row count [val]", "split mean intensity [val]", "class fractions"} <= set(failed)
    assert "labels in 0..9 [train]" not in failed
    assert check(result, "row count [val]")["observed"] == 0


def test_split_without_expected_size_is_an_error(good_table):
    with pytest.raises(validation.StageError, match="'val' has no expected size"):
        validation.validate(good_table, {"train": 400, "test": 200}, PARAMS)


def test_train_test_duplicates(good_table):
    params = dataclasses.replace(PARAMS, max_train_test_duplicates=10)

    def with_copies(k: int) -> pd.DataFrame:
        table = good_table.copy()
        train_hashes = table.loc[table["split"] == "train", "hash"].to_numpy()[:k]
        test_idx = table.index[table["split"] == "test"][:k]
        table.loc[test_idx, "hash"] = train_hashes
        return table

    at_limit = validation.validate(with_copies(10), SIZES, params)
    assert at_limit.success and at_limit.counts["duplicates"]["train-test"]["shared"] == 10
    over = validation.validate(with_copies(11), SIZES, params)
    assert failed_names(over) == ["train/val vs test duplicates"]
    assert check(over, "train/val vs test duplicates")["failed"] == ["train-test: 11"]
    assert "| train-test | 11 | 11 | 10 |" in over.to_markdown()


def test_duplicates_counted_from_image_content():
    splits = good_splits()
    test = splits["test"]
    images = test.images.clone()
    images[:5] = splits["val"].images[:5]
    splits["test"] = data.Split(images, test.labels)
    counts = validation.duplicate_counts(validation.image_table(splits)).set_index("pair")
    assert counts.loc["val-test", "shared"] == 5 and counts.loc["train-test", "shared"] == 0


# ----------------------------------------------------------------------------- stage script


def _load_stage():
    spec = importlib.util.spec_from_file_location("validate_stage", ROOT / "pipelines" / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_prepared(root: Path, splits: dict[str, data.Split], sizes: dict[str, int]) -> None:
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True)
    for name, split in splits.items():
        data.save_split(split, prepared / f"{name}.pt")
    (prepared / "meta.json").write_text(json.dumps({"sizes": sizes}))
    (root / "params.yaml").write_text("validate:\n  max_train_test_duplicates: 10\n")


def test_stage_passes_and_writes_report(tmp_path, monkeypatch, capsys, good_result):
    _write_prepared(tmp_path, good_splits(), SIZES)
    monkeypatch.chdir(tmp_path)
    stage = _load_stage()
    stage.run_stage(stage.main)
    out = capsys.readouterr().out
    assert "validation passed" in out
    result = json.loads((tmp_path / "data/validation/result.json").read_text())
    assert result["success"] is True
    assert "PASSED" in (tmp_path / "data/validation/summary.md").read_text()


def test_stage_fails_naming_expectations_but_writes_report(tmp_path, monkeypatch, capsys, good_result):
    _write_prepared(tmp_path, good_splits(), dict(SIZES, test=SIZES["test"] + 5))
    monkeypatch.chdir(tmp_path)
    stage = _load_stage()
    with pytest.raises(SystemExit) as exit_info:
        stage.run_stage(stage.main)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "FAILED row count [test]" in err and "error: data validation failed" in err
    assert json.loads((tmp_path / "data/validation/result.json").read_text())["success"] is False


def test_stage_missing_prepared_is_one_clear_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text("validate: {}\n")
    monkeypatch.chdir(tmp_path)
    stage = _load_stage()
    with pytest.raises(SystemExit):
        stage.run_stage(stage.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "meta.json: not found" in err[0] and "dvc repro prepare" in err[0]


def test_stage_bad_params_is_one_clear_line(tmp_path, monkeypatch, capsys):
    _write_prepared(tmp_path, good_splits(), SIZES)
    (tmp_path / "params.yaml").write_text("validate:\n  class_fraction_min: low\n")
    monkeypatch.chdir(tmp_path)
    stage = _load_stage()
    with pytest.raises(SystemExit):
        stage.run_stage(stage.main)
    err = capsys.readouterr().err.strip()
    assert err == "error: params.yaml: validate.class_fraction_min must be float, got 'low'"
