"""Stage report: one comparison of the four models and the real-data floor, as markdown and HTML."""
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mnistgen import report  # noqa: E402
from mnistgen.utils import StageError, atomic_write_text, run_stage  # noqa: E402

REPORTS = Path("reports")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StageError(f"{path}: cannot read ({err})") from err


def read_curves(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def main() -> None:
    results = {m: read_json(Path("metrics") / f"{m}.json") for m in report.MODELS}
    evaluator = read_json(Path("metrics/evaluator.json"))
    curves = {m: read_curves(Path("models") / m / "curves.csv") for m in report.MODELS}
    checks = report.claims(results, curves)
    markdown = report.build_markdown(results, evaluator["real_data"], evaluator, checks)
    page = report.build_html(results, evaluator["real_data"], checks, REPORTS,
                             {m: Path("models") / m / "curves.png" for m in report.MODELS})
    atomic_write_text(REPORTS / "comparison.md", markdown)
    atomic_write_text(REPORTS / "comparison.html", page)
    held = sum(v == report.HOLDS for _, v, _ in checks)
    close = sum(v == report.TOO_CLOSE for _, v, _ in checks)
    print(f"report: {held}/{len(checks)} of the design's claims hold" + (f", {close} too close to call" if close else "")
          + "; reports/comparison.md and reports/comparison.html")


if __name__ == "__main__":
    run_stage(main)
