"""The docs cite results that exist, and docs/results.md is what the records in bench-results/ give."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import report

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A result file: a dated (or 'undated') name in bench-results/. Undated names such as
# bench-results/serving.json are where a benchmark writes its scratch output, not results.
CITED_FILE = re.compile(r"bench-results/([\w.+-]+-(?:\d{4}-\d{2}-\d{2}|undated)[\w.+-]*\.jsonl?)")
CITED_ROW = re.compile(r"results\.md#([\w.+-]+)")


def test_every_result_file_the_docs_cite_exists() -> None:
    cited = {(doc.name, name) for doc in DOCS for name in CITED_FILE.findall(doc.read_text())}
    assert cited, "no doc cites a result file: the pattern no longer matches the docs"
    missing = sorted(c for c in cited if not (ROOT / "bench-results" / c[1]).is_file())
    assert not missing, f"cited but not in bench-results/: {missing}"


def test_every_row_the_docs_link_to_is_in_results_md() -> None:
    rows = {name for name, _ in report.records()}
    linked = {(doc.name, row) for doc in DOCS for row in CITED_ROW.findall(doc.read_text())}
    assert linked, "no doc links to a row of docs/results.md"
    assert not sorted(link for link in linked if link[1] not in rows)


def test_results_md_is_current_with_the_records() -> None:
    assert (ROOT / "docs" / "results.md").read_text() == report.render(), (
        "docs/results.md is stale: run `python -m benchmarks report` and commit it"
    )


def test_a_record_without_its_provenance_is_refused(tmp_path: Path) -> None:
    (tmp_path / "demo-2026-12-07.json").write_text(
        '{"meta": {"date": "2026-12-07", "machine": "2-core", "load": "idle", "commit": "abc"},'
        ' "figures": {}}'
    )
    (tmp_path / "demo.json").write_text('{"scratch": true}')  # scratch output: not a record
    with pytest.raises(ValueError, match="command"):
        report.render(tmp_path)
