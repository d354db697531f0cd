"""Data validation of the prepared splits with Great Expectations (1.x) suites.

`image_table` turns the splits into one row per image (label, shape, dtype, intensity
statistics, content hash). `validate` checks it with Great Expectations, in one
ephemeral context:

* suite `mnistgen-split`, run once per split on that split's rows (a batch per split):
  labels in 0..9, height and width 28, dtype uint8, pixel min >= 0 and max <= 255,
  per-image mean intensity in [image_mean_min, image_mean_max], the split's row count
  equal to the size prepare was asked for (a suite parameter), and the split's mean
  intensity in [split_mean_min, split_mean_max];
* suite `mnistgen-class-fractions` on a derived table with one row per (split, class
  0..9): every fraction in [class_fraction_min, class_fraction_max] (a missing class has
  fraction 0, so it fails);
* suite `mnistgen-duplicates` on a derived table with one row per split pair
  (train-test, val-test): test images whose exact content (hash) occurs in the other
  split, at most max_train_test_duplicates.

The `ValidationResult` holds one pandas row per expectation run (`checks`: check, split,
GE type, success, expected condition, observed value, and what failed where, naming the
split / class / pair) beside the split statistics, class fractions and duplicate counts
as DataFrames. `to_markdown` renders each table with `DataFrame.to_markdown`; `to_json`
writes GE's own result dicts (`to_json_dict`) and the tables through pandas' JSON writer.

Great Expectations takes several seconds to import, so it is imported inside `validate`
only: importing this module (or the rest of the library) never pulls it in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any

import numpy as np
import pandas as pd
import torch

from .config import ValidateParams
from .data import SPLITS, Split
from .utils import StageError

NUM_CLASSES = 10
IMAGE_SIZE = 28
COLUMNS = ["split", "label", "height", "width", "dtype", "min", "max", "mean", "hash"]
# Split pairs (a, b) whose shared images are counted: images of b whose content occurs in a.
# The first two are held to `max_train_test_duplicates`; train-val is reported only.
CHECKED_PAIRS = (("train", "test"), ("val", "test"))
REPORTED_PAIRS = (("train", "val"),)
SHOW_VALUES = 10  # how many failing values a check lists in the report


# ----------------------------------------------------------------------------- tables


def _hashes(flat: np.ndarray) -> list[str]:
    """128-bit blake2b hex digest of each row's bytes (~0.1 s for 70,000 MNIST images)."""
    blake = hashlib.blake2b
    return [blake(row.tobytes(), digest_size=16).hexdigest() for row in flat]


def image_table(splits: dict[str, Split]) -> pd.DataFrame:
    """One row per image: split, label, height, width, dtype, min, max, mean (0..255), hash.

    Nothing is checked here beyond what is needed to build the rows (one label per
    image); shapes, dtypes and values are reported as found, for `validate` to judge.
    """
    frames = []
    for name, split in splits.items():
        images, labels = split.images.detach().cpu(), split.labels.detach().cpu()
        n = images.shape[0] if images.dim() else 0
        if labels.dim() != 1 or labels.shape[0] != n:
            raise StageError(f"split {name!r}: images of shape {tuple(images.shape)} but labels of shape {tuple(labels.shape)}")
        height = images.shape[1] if images.dim() > 1 else 1
        width = int(np.prod(images.shape[2:], dtype=np.int64)) if images.dim() > 2 else 1
        dtype = str(images.dtype).removeprefix("torch.")
        if images.dtype.is_complex:
            images = images.abs()
        elif images.dtype in (torch.bfloat16, torch.bool):
            images = images.float()
        flat = np.ascontiguousarray(images.numpy().reshape(n, -1))
        if flat.shape[1]:
            lo, hi = flat.min(axis=1), flat.max(axis=1)
            mean = np.add.reduce(flat, axis=1, dtype=np.float64) / flat.shape[1]
        else:
            lo = hi = mean = np.full(n, np.nan)
        frames.append(
            pd.DataFrame(
                {
                    "split": np.full(n, name, dtype=object),
                    "label": labels.numpy().astype(np.int64, copy=False),
                    "height": np.full(n, height, dtype=np.int64),
                    "width": np.full(n, width, dtype=np.int64),
                    "dtype": np.full(n, dtype, dtype=object),
                    "min": lo.astype(np.float64),
                    "max": hi.astype(np.float64),
                    "mean": mean,
                    "hash": _hashes(flat),
                },
                columns=COLUMNS,
            )
        )
    if not frames:
        raise StageError("no splits to validate")
    return pd.concat(frames, ignore_index=True).astype({"split": "str", "dtype": "str", "hash": "str"})


def class_fractions(table: pd.DataFrame, splits: list[str]) -> pd.DataFrame:
    """One row per (split, class 0..9): count and fraction of the split's images with that label.

    Every class appears for every split: a missing class (or an empty split) has fraction 0.
    """
    full = pd.MultiIndex.from_product([splits, range(NUM_CLASSES)], names=["split", "label"])
    counts = table.groupby(["split", "label"]).size().reindex(full, fill_value=0)
    totals = table.groupby("split").size().reindex(splits, fill_value=0)
    out = counts.rename("count").reset_index()
    denom = out["split"].map(totals).to_numpy(dtype=np.float64)
    out["fraction"] = out["count"].to_numpy(dtype=np.float64) / np.where(denom > 0, denom, 1.0)
    return out


def duplicate_counts(table: pd.DataFrame, pairs=CHECKED_PAIRS + REPORTED_PAIRS) -> pd.DataFrame:
    """One row per pair (a, b): `shared` = images of split b whose exact content occurs in split a.

    Counting images of b (not distinct hashes) means two test copies of one train image
    count twice; `distinct` is the number of distinct shared hashes.
    """
    by_split = dict(tuple(table.groupby("split")["hash"]))
    empty = pd.Series([], dtype="str")
    rows = []
    for a, b in pairs:
        ha, hb = by_split.get(a, empty), by_split.get(b, empty)
        hit = hb.isin(set(ha))
        rows.append({"pair": f"{a}-{b}", "shared": int(hit.sum()), "distinct": int(hb[hit].nunique())})
    return pd.DataFrame(rows, columns=["pair", "shared", "distinct"])


# ----------------------------------------------------------------------------- result


@dataclasses.dataclass
class ValidationResult:
    """`checks` has one row per expectation run: name ("<check> [<split>]" or "<check>"),
    check, split (None for a cross-split check), expectation (GE type), success, expected
    (the condition), observed (GE's observed value, or "n of m unexpected, e.g. ..."),
    failed (what failed where, one string per split / class / pair; None when it passed)
    and ge (GE's result dict)."""

    checks: pd.DataFrame
    splits: pd.DataFrame  # per split: images, expected, describe() of the per-image mean intensity
    fractions: pd.DataFrame  # split x class 0..9: fraction of the split's images
    duplicates: pd.DataFrame  # per pair: shared, distinct, limit (None: reported only)
    seconds: float
    gx_import_seconds: float

    @property
    def success(self) -> bool:
        return bool(self.checks["success"].all())

    @property
    def failed(self) -> pd.DataFrame:
        return self.checks[~self.checks["success"]]

    @property
    def counts(self) -> dict[str, Any]:
        """The tables as plain JSON values (pandas' serializer: 6 decimals, NaN -> null)."""
        return {
            "rows": int(self.splits["images"].sum()),
            "splits": _plain(self.splits, "index"),
            "class_fractions": _plain(self.fractions, "index"),
            "duplicates": _plain(self.duplicates, "index"),
            "seconds": round(self.seconds, 3),
            "gx_import_seconds": round(self.gx_import_seconds, 3),
        }

    def failure_lines(self) -> list[str]:
        """One line per failed expectation: its name, GE type and what failed where."""
        return [f"{c.name} ({c.expectation}): {'; '.join(c.failed)}" for c in self.failed.itertuples()]

    def summary_line(self) -> str:
        dups = ", ".join(f"{pair} {n}" for pair, n in self.duplicates["shared"].items())
        return (
            f"validation {'passed' if self.success else 'FAILED'}: {self.checks['success'].sum()}/{len(self.checks)} "
            f"expectations met on {self.splits['images'].sum()} images; shared images {dups}"
        )

    def to_json(self) -> str:
        out = {"success": self.success, "checks": _plain(self.checks, "records"), "counts": self.counts}
        return json.dumps(out, indent=2, sort_keys=True) + "\n"

    def to_markdown(self) -> str:
        checks = self.checks.assign(
            result=self.checks["success"].map({True: "pass ", False: "**FAIL** "}) + self.checks["observed"].map(_fmt)
        )
        failed = checks[~checks["success"]].set_index("name")[["expectation", "failed"]]
        per_split, cross = checks[checks["split"].notna()], checks[checks["split"].isna()]
        by_split = per_split.pivot(index="check", columns="split", values="result")
        by_split = by_split.reindex(index=per_split["check"].unique(), columns=per_split["split"].unique())
        by_split.insert(0, "expected", per_split.groupby("check")["expected"].agg(lambda s: " / ".join(s.unique())))
        sections = [
            ("Failed expectations", failed.assign(failed=failed["failed"].str.join("; ")), {}),
            ("Per-split expectations", by_split, {}),
            ("Cross-split expectations", cross.set_index("check")[["expected", "result"]], {}),
            ("Splits: images and per-image mean intensity (0..255)", self.splits.round(2), {}),
            ("Class fractions", self.fractions, {"floatfmt": ".4f"}),
            (
                "Duplicate images: of the pair's 2nd split, also in its 1st (exact content hash)",
                self.duplicates,
                {"missingval": "(reported only)"},
            ),
        ]
        lines = [
            "# Data validation",
            "",
            f"**{'PASSED' if self.success else 'FAILED'}**: {checks['success'].sum()}/{len(checks)} Great Expectations "
            f"expectations met on {self.splits['images'].sum()} images.",
            "",
        ]
        for title, frame, fmt in sections:
            if len(frame):
                lines += [f"## {title}", "", frame.to_markdown(**fmt), ""]
        lines += [f"Validation took {self.seconds:.1f} s (Great Expectations import {self.gx_import_seconds:.1f} s).", ""]
        return "\n".join(lines)


def _plain(frame: pd.DataFrame, orient: str) -> Any:
    return json.loads(frame.to_json(orient=orient, double_precision=6))


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _condition(expectation: str, kwargs: dict[str, Any]) -> str:
    """GE kwargs as a condition: {'column': 'mean', 'min_value': 5, 'max_value': 120} -> '5 <= mean <= 120'."""
    column = kwargs.get("column", "rows")
    if "value_set" in kwargs:
        return f"{column} in {kwargs['value_set']}"
    if "value" in kwargs:
        return f"{column} == {kwargs['value']}"
    if expectation == "expect_column_mean_to_be_between":
        column = f"mean({column})"
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    return (f"{_fmt(lo)} <= " if lo is not None else "") + column + (f" <= {_fmt(hi)}" if hi is not None else "")


def _row(res, split: str | None, keys: list[str] | None) -> dict[str, Any]:
    """One row of `ValidationResult.checks` from one GE result: a split's (SUMMARY) or a derived table's (COMPLETE)."""
    ge = res.to_json_dict()
    check, kind = ge["expectation_config"]["meta"].get("check"), ge["expectation_config"]["type"]
    expected, result = _condition(kind, ge["expectation_config"]["kwargs"]), ge.get("result") or {}
    error = (ge.get("exception_info") or {}).get("exception_message")
    observed: Any  # GE's observed value (a number, a list, ...) or a sentence
    if error:
        observed, failed = f"error: {error}", [f"error: {error}"]
    elif "unexpected_count" not in result:  # an aggregate (row count, mean): what was seen against what was wanted
        observed = result.get("observed_value")
        failed = [f"{_fmt(observed)}, expected {expected}"]
    elif keys:  # a small derived table: every failing row, by its key
        failed = [
            "/".join(f"class {row[k]}" if k == "label" else str(row[k]) for k in keys) + f": {_fmt(value)}"
            for row, value in zip(result.get("unexpected_index_list") or [], result.get("unexpected_list") or [])
        ]
        observed = f"{result['unexpected_count']} of {result['element_count']} unexpected"
        observed += ": " + "; ".join(failed) if failed else ""
    else:  # a split's batch: a few of the failing values (GE's partial list)
        values = list(dict.fromkeys(map(_fmt, result.get("partial_unexpected_list") or [])))
        n_of = f"{result['unexpected_count']} of {result['element_count']}"
        observed = f"{n_of} unexpected" + (f", e.g. {', '.join(values[:3])}" if values else "")
        failed = [f"{n_of} images, e.g. {', '.join(values)}"]
    return {
        "name": f"{check} [{split}]" if split else check,
        "check": check,
        "split": split,
        "expectation": kind,
        "success": bool(ge["success"]),
        "expected": expected,
        "observed": observed,
        "failed": None if ge["success"] else [f"{split}: {f}" for f in failed] if split else failed,
        "ge": ge,
    }


# ----------------------------------------------------------------------------- validate

INDEX_COLUMNS = {"class_fractions": ["split", "label"], "duplicates": ["pair"]}


def _split_expectations(E, params: ValidateParams) -> list[tuple[str, Any]]:
    """(check name, expectation) run on each split's batch; row count is a suite parameter."""
    return [
        ("labels in 0..9", E.ExpectColumnValuesToBeBetween(column="label", min_value=0, max_value=NUM_CLASSES - 1)),
        (f"height == {IMAGE_SIZE}", E.ExpectColumnValuesToBeInSet(column="height", value_set=[IMAGE_SIZE])),
        (f"width == {IMAGE_SIZE}", E.ExpectColumnValuesToBeInSet(column="width", value_set=[IMAGE_SIZE])),
        ("dtype uint8", E.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"])),
        ("pixel min >= 0", E.ExpectColumnValuesToBeBetween(column="min", min_value=0)),
        ("pixel max <= 255", E.ExpectColumnValuesToBeBetween(column="max", max_value=255)),
        (
            "image mean intensity",
            E.ExpectColumnValuesToBeBetween(column="mean", min_value=params.image_mean_min, max_value=params.image_mean_max),
        ),
        ("row count", E.ExpectTableRowCountToEqual(value={"$PARAMETER": "expected_rows"})),
        (
            "split mean intensity",
            E.ExpectColumnMeanToBeBetween(column="mean", min_value=params.split_mean_min, max_value=params.split_mean_max),
        ),
    ]


def _derived_expectations(E, params: ValidateParams) -> dict[str, list[tuple[str, Any]]]:
    return {
        "class_fractions": [
            (
                "class fractions",
                E.ExpectColumnValuesToBeBetween(
                    column="fraction", min_value=params.class_fraction_min, max_value=params.class_fraction_max
                ),
            )
        ],
        "duplicates": [
            (
                "train/val vs test duplicates",
                E.ExpectColumnValuesToBeBetween(column="shared", max_value=params.max_train_test_duplicates),
            )
        ],
    }


def validate(table: pd.DataFrame, expected_sizes: dict[str, int], params: ValidateParams) -> ValidationResult:
    """Validate an `image_table` against the split sizes prepare produced and the bands in `params`.

    Every split in `expected_sizes` is checked (one missing from the table fails its row
    count); a split in the table must have an expected size.
    """
    started = time.perf_counter()
    unknown = sorted(set(table["split"].unique()) - set(expected_sizes))
    if unknown:
        raise StageError(f"split {unknown[0]!r} has no expected size (known: {', '.join(expected_sizes)})")
    splits = [s for s in SPLITS if s in expected_sizes] + [s for s in expected_sizes if s not in SPLITS]

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx  # slow (several seconds): imported here only
    from great_expectations.data_context.types.base import ProgressBarsConfig

    gx_import_s = time.perf_counter() - started
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("mnistgen")

    def definition(kind: str, expectations: list[tuple[str, Any]]):
        suite = gx.ExpectationSuite(name=f"mnistgen-{kind}")
        for name, expectation in expectations:
            expectation.meta = {"check": name}
            suite.add_expectation(expectation)
        suite = context.suites.add(suite)
        batch = source.add_dataframe_asset(kind).add_batch_definition_whole_dataframe(kind)
        return context.validation_definitions.add(gx.ValidationDefinition(name=f"mnistgen-{kind}", data=batch, suite=suite))

    def in_order(results, expectations):
        """GE may reorder a suite's results: put them back in the order they were declared."""
        rank = {name: i for i, (name, _) in enumerate(expectations)}
        return sorted(results, key=lambda r: rank.get(r.expectation_config.meta.get("check"), len(rank)))

    checks = []
    # 1. one batch per split, same suite (fast SUMMARY results: no per-row index lists)
    split_expectations = _split_expectations(gx.expectations, params)
    per_split = definition("split", split_expectations)
    groups = dict(tuple(table.groupby("split", sort=False)))
    for name in splits:
        run = per_split.run(
            batch_parameters={"dataframe": groups.get(name, table.iloc[:0]).reset_index(drop=True)},
            expectation_parameters={"expected_rows": int(expected_sizes[name])},
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": SHOW_VALUES},
        )
        checks += [_row(res, name, None) for res in in_order(run.results, split_expectations)]

    # 2. derived tables: per-(split, class) fractions and per-pair duplicate counts
    fractions = class_fractions(table, splits)
    duplicates = duplicate_counts(table)
    derived = {"class_fractions": fractions, "duplicates": duplicates.iloc[: len(CHECKED_PAIRS)]}
    for kind, expectations in _derived_expectations(gx.expectations, params).items():
        run = definition(kind, expectations).run(
            batch_parameters={"dataframe": derived[kind]},
            result_format={
                "result_format": "COMPLETE",
                "unexpected_index_column_names": INDEX_COLUMNS[kind],
                "return_unexpected_index_query": False,
            },
        )
        checks += [_row(res, None, INDEX_COLUMNS[kind]) for res in in_order(run.results, expectations)]

    # 3. the report's tables
    stats = table.groupby("split")["mean"].describe(percentiles=[0.01, 0.99]).reindex(splits)
    stats = stats.rename(columns={"count": "images"}).fillna({"images": 0}).astype({"images": int})
    stats.insert(1, "expected", [int(expected_sizes[s]) for s in splits])
    checked = {f"{a}-{b}" for a, b in CHECKED_PAIRS}
    limits = [params.max_train_test_duplicates if pair in checked else None for pair in duplicates["pair"]]
    return ValidationResult(
        checks=pd.DataFrame(checks),
        splits=stats,
        fractions=fractions.pivot(index="split", columns="label", values="fraction").reindex(splits),
        duplicates=duplicates.assign(limit=pd.Series(limits, dtype=object)).set_index("pair"),
        seconds=time.perf_counter() - started,
        gx_import_seconds=gx_import_s,
    )
