"""Data validation (mnistgen.validation + mnistgen.stages.validate) on small synthetic splits.

Great Expectations is imported once (by the first `validate` call, in a module-scoped
fixture); every later call only builds a new ephemeral context. The markdown report is
checked cell by cell (`md_rows`), not by its column padding.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from mnistgen import data, validation
from mnistgen.config import ValidateParams
from mnistgen.utils import sha256_file

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"train": 400, "val": 100, "test": 200}
# params.yaml's validate section, spelled out: the synthetic splits below are made to pass these bands
VALUES = {
    "class_fraction_min": 0.08,
    "class_fraction_max": 0.12,
    "image_mean_min": 5.0,
    "image_mean_max": 120.0,
    "split_mean_min": 25.0,
    "split_mean_max": 40.0,
    "max_train_test_duplicates": 10,
}
PARAMS = ValidateParams(**VALUES)


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
    return result.failed["name"].tolist()


def check(result: validation.ValidationResult, name: str) -> pd.Series:
    rows = result.checks[result.checks["name"] == name]
    assert len(rows) == 1, f"{len(rows)} checks named {name!r}"
    return rows.iloc[0]


def md_table(md: str, title: str) -> dict[str, list[str]]:
    """The markdown table under the heading `## <title>...` as {first cell: the other cells, stripped}."""
    assert f"\n## {title}" in md, f"no section {title!r}"
    section = md.split(f"\n## {title}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    return {row[0]: row[1:] for row in rows}


@pytest.fixture(scope="module")
def good_table() -> pd.DataFrame:
    return validation.image_table(good_splits())


@pytest.fixture(scope="module")
def good_result(good_table) -> validation.ValidationResult:
    return validation.validate(good_table, SIZES, PARAMS)  # imports GE (once per session)


def test_library_import_does_not_import_great_expectations():
    code = "import sys; import mnistgen.validation, mnistgen.data; print('great_expectations' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
        check=True,
    )
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
    names = good_result.checks["name"].tolist()
    for split in SIZES:
        for check_name in (
            "labels in 0..9",
            "height == 28",
            "width == 28",
            "dtype uint8",
            "pixel min >= 0",
            "pixel max <= 255",
            "image mean intensity",
            "row count",
            "split mean intensity",
        ):
            assert f"{check_name} [{split}]" in names
    assert "class fractions" in names and "train/val vs test duplicates" in names
    assert check(good_result, "row count [val]")["observed"] == SIZES["val"]
    assert 25 < check(good_result, "split mean intensity [train]")["observed"] < 40
    assert good_result.counts["duplicates"]["train-test"]["shared"] == 0
    assert good_result.counts["class_fractions"]["train"]["3"] == pytest.approx(0.1)


def test_report_json_and_markdown(good_result):
    loaded = json.loads(good_result.to_json())
    assert loaded["success"] is True and len(loaded["checks"]) == len(good_result.checks)
    assert set(loaded) == {"success", "checks", "counts"}
    first = loaded["checks"][0]  # GE's own result dict rides along with the row
    assert first["name"] == "labels in 0..9 [train]" and first["ge"]["expectation_config"]["type"] == first["expectation"]
    assert first["ge"]["result"]["element_count"] == SIZES["train"]
    assert loaded["counts"]["splits"]["val"]["images"] == SIZES["val"] and loaded["counts"]["rows"] == sum(SIZES.values())
    md = good_result.to_markdown()
    assert "PASSED" in md and "Failed expectations" not in md
    assert md_table(md, "Cross-split")["class fractions"] == ["0.08 <= fraction <= 0.12", "pass 0 of 30 unexpected"]
    dups = md_table(md, "Duplicate images")
    assert dups["train-test"] == ["0", "0", "10"] and dups["train-val"] == ["0", "0", "(reported only)"]
    per_split = md_table(md, "Per-split")
    assert per_split["check"] == ["expected", *SIZES]  # one column per split, in order
    assert per_split["row count"][1:] == [f"pass {n}" for n in SIZES.values()]
    assert per_split["split mean intensity"][0] == "25 <= mean(mean) <= 40"
    stats = md_table(md, "Splits")
    assert stats["split"][:2] == ["images", "expected"] and stats["val"][:2] == [str(SIZES["val"])] * 2
    assert md_table(md, "Class fractions")["train"][3] == "0.1000"


def test_label_out_of_range_fails(good_table):
    table = good_table.copy()
    table.loc[table.index[table["split"] == "val"][0], "label"] = 11
    result = validation.validate(table, SIZES, PARAMS)
    assert failed_names(result) == ["labels in 0..9 [val]"]
    c = check(result, "labels in 0..9 [val]")
    assert c["observed"] == f"1 of {SIZES['val']} unexpected, e.g. 11"
    assert c["ge"]["result"]["unexpected_count"] == 1 and c["ge"]["result"]["partial_unexpected_list"] == [11]
    assert c["failed"] == [f"val: 1 of {SIZES['val']} images, e.g. 11"]
    md = result.to_markdown()
    assert "**FAILED**" in md
    assert md_table(md, "Failed expectations")["labels in 0..9 [val]"] == [
        "expect_column_values_to_be_between",
        f"val: 1 of {SIZES['val']} images, e.g. 11",
    ]
    per_split = md_table(md, "Per-split")
    assert per_split["labels in 0..9"][per_split["check"].index("val")] == f"**FAIL** 1 of {SIZES['val']} unexpected, e.g. 11"


def test_wrong_shape_fails():
    splits = good_splits()
    splits["val"] = synthetic_split(SIZES["val"], seed=7, width=27)
    result = validation.validate(validation.image_table(splits), SIZES, PARAMS)
    assert failed_names(result) == ["width == 28 [val]"]
    assert check(result, "width == 28 [val]")["observed"] == f"{SIZES['val']} of {SIZES['val']} unexpected, e.g. 27"


def test_wrong_dtype_and_intensity_fail(good_table):
    table = good_table.copy()
    test_rows = table["split"] == "test"
    table.loc[test_rows, "dtype"] = "float32"
    table.loc[test_rows, "mean"] = table.loc[test_rows, "mean"] / 255.0  # images scaled to 0..1
    result = validation.validate(table, SIZES, PARAMS)
    failed = failed_names(result)
    assert failed == ["dtype uint8 [test]", "image mean intensity [test]", "split mean intensity [test]"]
    assert check(result, "dtype uint8 [test]")["observed"] == f"{SIZES['test']} of {SIZES['test']} unexpected, e.g. float32"


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


def test_failing_markdown_names_split_and_class_in_table_rows():
    splits = good_splits()
    labels = splits["test"].labels.clone()
    labels[labels == 7] = 3
    splits["test"] = data.Split(splits["test"].images, labels)
    md = validation.validate(validation.image_table(splits), SIZES, PARAMS).to_markdown()
    assert md.startswith("# Data validation") and "**FAILED**: 28/29" in md
    expectation, failed = md_table(md, "Failed expectations")["class fractions"]
    assert expectation == "expect_column_values_to_be_between"
    assert failed.split("; ") == ["test/class 3: 0.2", "test/class 7: 0"]
    expected, cross = md_table(md, "Cross-split")["class fractions"]
    assert cross == "**FAIL** 2 of 30 unexpected: test/class 3: 0.2; test/class 7: 0"
    fractions = md_table(md, "Class fractions")
    assert fractions["split"] == [str(k) for k in range(10)]
    assert fractions["test"][7] == "0.0000" and fractions["test"][3] == "0.2000" and fractions["val"][7] == "0.1000"


def test_row_count_mismatch_fails(good_table):
    sizes = dict(SIZES, train=SIZES["train"] + 1)
    result = validation.validate(good_table, sizes, PARAMS)
    assert failed_names(result) == ["row count [train]"]
    c = check(result, "row count [train]")
    assert c["observed"] == SIZES["train"] and c["expected"] == f"rows == {SIZES['train'] + 1}"
    assert c["ge"]["expectation_config"]["kwargs"]["value"] == SIZES["train"] + 1  # the suite parameter, resolved
    assert c["failed"] == [f"train: {SIZES['train']}, expected rows == {SIZES['train'] + 1}"]


def test_missing_split_fails():
    splits = good_splits()
    del splits["val"]
    result = validation.validate(validation.image_table(splits), SIZES, PARAMS)
    failed = failed_names(result)
    assert {"row count [val]", "split mean intensity [val]", "class fractions"} <= set(failed)
    assert "labels in 0..9 [train]" not in failed
    assert check(result, "row count [val]")["observed"] == 0
    loaded = json.loads(result.to_json(), parse_constant=lambda name: pytest.fail(f"{name} in result.json"))
    assert loaded["counts"]["splits"]["val"]["images"] == 0 and loaded["counts"]["splits"]["val"]["mean"] is None


def test_split_without_expected_size_is_an_error(good_table):
    with pytest.raises(validation.StageError, match="'val' has no expected size"):
        validation.validate(good_table, {"train": 400, "test": 200}, PARAMS)


def test_train_test_duplicates(good_table):
    params = ValidateParams(**dict(VALUES, max_train_test_duplicates=10))

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
    assert md_table(over.to_markdown(), "Duplicate images")["train-test"] == ["11", "11", "10"]


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
    return importlib.import_module("mnistgen.stages.validate")


def _write_prepared(root: Path, splits: dict[str, data.Split], sizes: dict[str, int]) -> None:
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True)
    for name, split in splits.items():
        data.save_split(split, prepared / f"{name}.pt")
    (prepared / "meta.json").write_text(
        json.dumps({"sizes": sizes, "sha256": {name: sha256_file(prepared / f"{name}.pt") for name in splits}})
    )
    write_params(root)


def write_params(root: Path, **changes) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump({"validate": dict(VALUES, **changes)}))


@pytest.fixture
def stage_argv(monkeypatch):
    """The stage's command line as dvc.yaml gives it (run with the test's tmp_path as cwd)."""
    monkeypatch.setattr(
        sys, "argv", ["validate.py", "--data", "data/prepared", "--out", "data/validation", "--passed", "data/validated.json"]
    )


def test_stage_passes_and_writes_report(tmp_path, monkeypatch, capsys, stage_argv, good_result):
    _write_prepared(tmp_path, good_splits(), SIZES)
    monkeypatch.chdir(tmp_path)
    stage = _load_stage()
    stage.run_stage(stage.main)
    out = capsys.readouterr().out
    assert "validation passed" in out
    result = json.loads((tmp_path / "data/validation/result.json").read_text())
    assert result["success"] is True
    assert "PASSED" in (tmp_path / "data/validation/summary.md").read_text()
    meta = json.loads((tmp_path / "data/prepared/meta.json").read_text())
    passed = json.loads((tmp_path / "data/validated.json").read_text())  # what later stages depend on: the data alone
    assert passed == {"sizes": SIZES, "sha256": meta["sha256"]}


def test_stage_fails_naming_expectations_but_writes_report(tmp_path, monkeypatch, capsys, stage_argv, good_result):
    _write_prepared(tmp_path, good_splits(), dict(SIZES, test=SIZES["test"] + 5))
    monkeypatch.chdir(tmp_path)
    stage = _load_stage()
    with pytest.raises(SystemExit) as exit_info:
        stage.run_stage(stage.main)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "FAILED row count [test]" in err and "error: data validation failed" in err
    assert f"test: {SIZES['test']}, expected rows == {SIZES['test'] + 5}" in err
    assert json.loads((tmp_path / "data/validation/result.json").read_text())["success"] is False
    assert not (tmp_path / "data/validated.json").exists()  # failed data unlocks no later stage


def test_stage_missing_prepared_is_one_clear_line(tmp_path, monkeypatch, capsys, stage_argv):
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    stage = _load_stage()
    with pytest.raises(SystemExit):
        stage.run_stage(stage.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "meta.json: not found" in err[0] and "dvc repro prepare" in err[0]


def test_stage_bad_params_is_one_clear_line(tmp_path, monkeypatch, capsys, stage_argv):
    _write_prepared(tmp_path, good_splits(), SIZES)
    write_params(tmp_path, class_fraction_min="low")
    monkeypatch.chdir(tmp_path)
    stage = _load_stage()
    with pytest.raises(SystemExit):
        stage.run_stage(stage.main)
    err = capsys.readouterr().err.strip()
    # one line naming the key and the bad value (the wording is config.py's)
    assert "\n" not in err and err.startswith("error: params.yaml: validate.class_fraction_min") and err.endswith("got 'low'")
