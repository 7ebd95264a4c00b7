"""The README's Accuracy and Performance sections are the benchmarks' rendered results (benchmarks/report.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_sections_match_the_committed_results():
    report = _report()
    readme = (ROOT / "README.md").read_text()
    assert report.render(readme) == readme, "README.md is out of date: run `python benchmarks/report.py`"


def test_splice_replaces_only_between_markers_and_demotes_headings():
    report = _report()
    readme = "# T\n## Accuracy\n<!-- results:accuracy -->\nold\n<!-- /results:accuracy -->\n## Next\n"
    body = report.demote_headings("# Title\ntext\n## Sub\n#not a heading\n")
    assert body == "### Title\ntext\n#### Sub\n#not a heading\n"
    out = report.splice(readme, "accuracy", body)
    start, end = "<!-- results:accuracy -->", "<!-- /results:accuracy -->"
    assert out == f"# T\n## Accuracy\n{start}\n{body.strip()}\n{end}\n## Next\n"
    with pytest.raises(ValueError, match="no <!-- results:speed -->"):
        report.splice(readme, "speed", body)
