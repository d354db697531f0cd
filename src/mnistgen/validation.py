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

The `ValidationResult` names every failed expectation with the split / class / pair that
failed. Great Expectations takes several seconds to import, so it is imported inside
`validate` only: importing this module (or the rest of the library) never pulls it in.
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
    success: bool
    # one dict per expectation run: name, check, split (or None), table, expectation,
    # success, expected (the expectation's kwargs), observed, and `failed` (what failed
    # where, one string per split / class / pair) when it failed
    checks: list[dict[str, Any]]
    counts: dict[str, Any]  # rows, per-split sizes and intensities, class fractions, duplicates, timings

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [c for c in self.checks if not c["success"]]

    def failure_lines(self) -> list[str]:
        """One line per failed expectation: its name, GE type and what failed where."""
        return [f"{c['name']} ({c['expectation']}): {'; '.join(c.get('failed') or [_fmt(c['observed'])])}" for c in self.failed]

    def summary_line(self) -> str:
        n_ok = sum(c["success"] for c in self.checks)
        dups = ", ".join(f"{pair} {d['shared']}" for pair, d in self.counts.get("duplicates", {}).items())
        return (
            f"validation {'passed' if self.success else 'FAILED'}: {n_ok}/{len(self.checks)} expectations met "
            f"on {self.counts.get('rows', 0)} images; shared images {dups}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"success": self.success, "checks": self.checks, "counts": self.counts}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=_json_default) + "\n"

    def to_markdown(self) -> str:
        c = self.counts
        n_ok = sum(x["success"] for x in self.checks)
        lines = [
            "# Data validation",
            "",
            f"**{'PASSED' if self.success else 'FAILED'}**: {n_ok}/{len(self.checks)} Great Expectations "
            f"expectations met on {c.get('rows', 0)} images.",
            "",
        ]
        if self.failed:
            lines += ["## Failed expectations", ""]
            lines += [f"- **{x['name']}** {line[len(x['name']) + 1:]}" for x, line in zip(self.failed, self.failure_lines())]
            lines.append("")

        per_split = [x for x in self.checks if x.get("split") is not None]
        split_names = list(dict.fromkeys(x["split"] for x in per_split))
        if per_split:
            lines += ["## Per-split expectations", ""]
            lines.append("| check | expected | " + " | ".join(split_names) + " |")
            lines.append("|---|---|" + "---|" * len(split_names))
            by_check: dict[str, dict[str, dict]] = {}
            for x in per_split:
                by_check.setdefault(x["check"], {})[x["split"]] = x
            for check, cells in by_check.items():
                texts = {s: _expected_text(x) for s, x in cells.items()}
                same = len(set(texts.values())) == 1
                expected = _cell(next(iter(texts.values()))) if same else "see cells"
                row = [
                    _result_cell(cells[s]) + ("" if same else f" (expected {_cell(texts[s])})") if s in cells else ""
                    for s in split_names
                ]
                lines.append(f"| {check} | {expected} | " + " | ".join(row) + " |")
            lines.append("")
        others = [x for x in self.checks if x.get("split") is None]
        if others:
            lines += ["## Cross-split expectations", "", "| check | expected | result |", "|---|---|---|"]
            for x in others:
                lines.append(f"| {x['name']} | {_cell(_expected_text(x))} | {_result_cell(x)} |")
            lines.append("")

        if c.get("splits"):
            lines += [
                "## Splits",
                "",
                "| split | images | expected | mean intensity | per-image mean: min | 1% | 99% | max |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for name, s in c["splits"].items():
                band = " | ".join(_fmt(s[k]) for k in ("image_mean_min", "image_mean_p01", "image_mean_p99", "image_mean_max"))
                lines.append(f"| {name} | {s['rows']} | {s['expected_rows']} | {_fmt(s['mean'])} | {band} |")
            lines.append("")
        if c.get("class_fractions"):
            lines += ["## Class fractions", "", "| split | " + " | ".join(str(k) for k in range(NUM_CLASSES)) + " |"]
            lines.append("|---" * (NUM_CLASSES + 1) + "|")
            for name, fr in c["class_fractions"].items():
                lines.append(f"| {name} | " + " | ".join(f"{fr.get(str(k), 0.0):.4f}" for k in range(NUM_CLASSES)) + " |")
            lines.append("")
        if c.get("duplicates"):
            lines += [
                "## Duplicate images (exact content hash)",
                "",
                "| pair | images of 2nd split also in 1st | distinct | limit |",
                "|---|---|---|---|",
            ]
            for pair, d in c["duplicates"].items():
                limit = d["limit"] if d["limit"] is not None else "(reported only)"
                lines.append(f"| {pair} | {d['shared']} | {d['distinct']} | {limit} |")
            lines.append("")
        if c.get("seconds") is not None:
            lines += [f"Validation took {c['seconds']:.1f} s (Great Expectations import {c['gx_import_seconds']:.1f} s).", ""]
        return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _round(value: Any) -> Any:
    """JSON-friendly copy: numpy scalars to Python, floats to 6 decimals, dict keys to str."""
    if isinstance(value, (float, np.floating)):
        return round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): _round(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round(v) for v in value]
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def _expected_text(check: dict[str, Any]) -> str:
    """A check's kwargs as a condition: {'column': 'mean', 'min_value': 5, 'max_value': 120} -> '5 <= mean <= 120'."""
    kwargs = check["expected"]
    column = kwargs.get("column", "rows")
    if "value_set" in kwargs:
        return f"{column} in {_fmt(kwargs['value_set'])}"
    if "value" in kwargs:
        return f"{column} == {_fmt(kwargs['value'])}"
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    if check["expectation"] == "expect_column_mean_to_be_between":
        column = f"mean({column})"
    text = column
    if lo is not None:
        text = f"{_fmt(lo)} <= {text}"
    if hi is not None:
        text = f"{text} <= {_fmt(hi)}"
    return text


def _result_cell(check: dict[str, Any]) -> str:
    obs = check["observed"]
    if isinstance(obs, dict) and "unexpected" in obs:
        text = f"{obs['unexpected']} of {obs['of']} unexpected"
        if obs.get("values"):
            text += ", e.g. " + ", ".join(obs["values"][:3])
        elif obs.get("rows"):
            text += ": " + "; ".join(obs["rows"])
    else:
        text = _fmt(obs)
    return _cell(("pass " if check["success"] else "**FAIL** ") + text)


# ----------------------------------------------------------------------------- validate

SPLIT_SUITE = "mnistgen-split"
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


def _observed(res: dict[str, Any], index_columns: list[str] | None) -> tuple[Any, list[str] | None]:
    """(observed, failures) from one GE expectation-result dict."""
    result = res.get("result") or {}
    exception = (res.get("exception_info") or {}).get("exception_message")
    if exception:
        return f"error: {exception}", [f"error: {exception}"]
    if "unexpected_count" not in result:
        return result.get("observed_value"), None
    n_bad = int(result.get("unexpected_count") or 0)
    observed: dict[str, Any] = {"unexpected": n_bad, "of": int(result.get("element_count") or 0)}
    if not n_bad:
        return observed, None
    if index_columns is None:  # a split's batch: a few of the failing values (GE's partial list)
        observed["values"] = list(dict.fromkeys(_fmt(_round(v)) for v in result.get("partial_unexpected_list") or []))
        return observed, [f"{n_bad} of {observed['of']} images, e.g. {', '.join(observed['values'])}"]
    failures = []  # a small derived table: every failing row, by its key
    for row, value in zip(result.get("unexpected_index_list") or [], result.get("unexpected_list") or []):
        key = "/".join(f"class {row[c]}" if c == "label" else str(row[c]) for c in index_columns)
        failures.append(f"{key}: {_fmt(_round(value))}")
    observed["rows"] = failures
    return observed, failures


def _check(name: str, check: str, split: str | None, table: str, res, index_columns) -> dict[str, Any]:
    cfg = res.expectation_config
    observed, failures = _observed(res.to_json_dict(), index_columns)
    expected = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format") and v is not None}
    out = {
        "name": name,
        "check": check,
        "split": split,
        "table": table,
        "expectation": cfg.type,
        "success": bool(res.success),
        "expected": _round(expected),
        "observed": _round(observed),
    }
    if not res.success:
        if not failures:  # an aggregate (row count, mean): what was seen against what was wanted
            failures = [f"{_fmt(out['observed'])}, expected {_expected_text(out)}"]
        out["failed"] = [f"{split}: {f}" for f in failures] if split else failures
    return out


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

    checks: list[dict[str, Any]] = []
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
        for res in in_order(run.results, split_expectations):
            check = res.expectation_config.meta.get("check", res.expectation_config.type)
            checks.append(_check(f"{check} [{name}]", check, name, "images", res, None))

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
        for res in in_order(run.results, expectations):
            check = res.expectation_config.meta.get("check", res.expectation_config.type)
            checks.append(_check(check, check, None, kind, res, INDEX_COLUMNS[kind]))

    counts = _counts(table, groups, fractions, duplicates, expected_sizes, splits, params)
    counts["seconds"] = round(time.perf_counter() - started, 3)
    counts["gx_import_seconds"] = round(gx_import_s, 3)
    return ValidationResult(success=all(c["success"] for c in checks), checks=checks, counts=counts)


def _counts(table, groups, fractions, duplicates, expected_sizes, splits, params) -> dict[str, Any]:
    per_split = {}
    for name in splits:
        means = groups[name]["mean"] if name in groups else pd.Series([], dtype=float)
        stat = lambda f: float(f(means)) if len(means) else None  # noqa: E731
        per_split[name] = {
            "rows": int(len(means)),
            "expected_rows": int(expected_sizes[name]),
            "mean": stat(pd.Series.mean),
            "image_mean_min": stat(pd.Series.min),
            "image_mean_p01": stat(lambda s: s.quantile(0.01)),
            "image_mean_p99": stat(lambda s: s.quantile(0.99)),
            "image_mean_max": stat(pd.Series.max),
        }
    class_fr = {
        name: {str(int(r.label)): float(r.fraction) for r in fractions[fractions["split"] == name].itertuples()}
        for name in splits
    }
    checked = {f"{a}-{b}" for a, b in CHECKED_PAIRS}
    dups = {
        r.pair: {
            "shared": int(r.shared),
            "distinct": int(r.distinct),
            "limit": params.max_train_test_duplicates if r.pair in checked else None,
        }
        for r in duplicates.itertuples()
    }
    return _round({"rows": int(len(table)), "splits": per_split, "class_fractions": class_fr, "duplicates": dups})
