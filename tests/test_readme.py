"""README.md is a user's page: at most 150 lines, its results table is metrics/ at HEAD, its commands are the CI's."""

import json
import re

from helpers import ROOT

from mnistgen import report
from mnistgen.config import model_names

README = (ROOT / "README.md").read_text()


def test_the_results_table_is_the_committed_metrics():
    """Every figure of the table between the results markers is what report.headline_table makes of the test metrics
    and of the spread over training seeds (metrics/test/, metrics/seeds/): the report's numbers, never validation's."""
    table = re.search(r"<!-- results:start -->\n(.*?)\n<!-- results:end -->", README, re.S)
    assert table, "README.md has no results table between <!-- results:start --> and <!-- results:end -->"
    models = model_names(ROOT / "params.yaml")
    results = {m: json.loads((ROOT / "metrics" / "test" / f"{m}.json").read_text()) for m in models}
    seeds = {m: json.loads((ROOT / "metrics" / "seeds" / f"{m}.json").read_text()) for m in models}
    assert all(r["split"] == "test" for r in results.values())
    assert table.group(1).strip() == report.headline_table(report.with_seed_spread(results, seeds))
    assert "; sd " in table.group(1)


def test_the_readme_is_short_and_its_commands_are_the_ones_ci_runs():
    assert len(README.splitlines()) <= 150
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ("python -m pytest", "pip install -q -r requirements.lock"):
        assert command in README and command in ci, command
    assert "dvc repro" in README
    for page in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / page).exists(), page
