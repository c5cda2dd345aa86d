"""The docs cite results that exist, docs/results.md is what the records in bench-results/ give,
and no other doc states a measured figure that a row of results.md it links to does not hold."""

from __future__ import annotations

import functools
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

# A number with a unit of time, memory, rate, share or ratio: "0.34 s", "1,293 img/s",
# "95.50%", "2.9x", "0.24 to 0.42 s", "150-175 MiB".
_NUMBER = r"\d[\d,]*(?:\.\d+)?"
_UNIT = (
    r"µs|us|ms|s|seconds?|min|minutes?|hours?|KiB|MiB|GiB|KB|kB|MB|GB|"
    r"img/s|images/s|req/s|requests/s|steps/s|%|points?"
)
FIGURE = re.compile(
    rf"(?<![\w.#/-])[-+~]?{_NUMBER}(?:\s?(?:-|\u2013|to|/)\s?{_NUMBER})*\s?(?P<unit>{_UNIT})"
    rf"(?![\w/])(?!\s?\d)|(?<![\w.#/-]){_NUMBER}(?P<ratio>[x\u00d7])(?![\w/])(?!\s?\d)"
)
# A rate is always a measurement; any other figure is one where its sentence says it was
# measured ("took", "median", "p99", "RSS", "on the development VM", "reads 95%", ...) or where
# a target follows it ("7.0 s (target <= 10 s)").
RATES = {"img/s", "images/s", "req/s", "requests/s", "steps/s"}
MEASURING = re.compile(
    r"\b(?:took|median|p50|p99|peak|RSS|USS|about|roughly|load average|development VM|"
    r"dev VM|2-core|busy|we found|faster|slower|throughput|vs\.?)\b"
    r"|\bidle(?:[,)]| (?:on|machine|VM))|\bmeasured (?:on|in|with|by|back|idle)\b|^measured\b"
    r"|\breads? (?:a |about |only )?[-+~]?\d|\bcost(?:s|ing)? (?:about )?\d|\bagainst \d"
    r"|\btakes? (?:about )?[~\d]|\bmapped\b|\bback in\b|\bhealthy (?:again )?in\b|→|->|(?<!\w)~\d",
    re.I,
)
TARGETED = re.compile(r"\s*\(target")
BOUND_AFTER = re.compile(r"\s*(?:or (?:more|less|longer|fewer)|targets?)\b")
# A figure right after one of these, or followed by "or more", is a bound (a setting, a limit,
# a target), not a result.
BOUND = re.compile(
    r"(?:\b(?:at most|at least|within|up to|under|over|more than|less than|below|above|"
    r"default|limit|cap|every|each|load of)|[≤≥<>]=?)\W*(?:`[^`]*`\W*)?$",
    re.I,
)
# Configured limits that share a sentence with measuring words: (doc, the figure as written).
SETTINGS = {
    ("training.md", "~5 minutes"),  # the demo preset's time budget (max_minutes)
    ("training.md", "4.6 min"),  # the same budget in the presets table
    ("training.md", "9.5 min cap"),  # the folder preset's budget
    ("README.md", "95% interval"),  # the confidence level cv prints
}
_FENCE = re.compile(r"^\s*(```|~~~)")
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+(?=[A-Z(\[`*_])")


def passages(text: str) -> list[tuple[int, str]]:
    """(line, text) of each prose sentence, table row and line of a fenced block; blocks whose
    prose introduces them "for example" are illustrations and left out."""
    found: list[tuple[int, str]] = []
    block: list[str] = []
    start, fenced, example, last_prose = 0, False, False, ""

    def flush() -> None:
        if block:
            found.extend((start, s) for s in _SENTENCE_END.split(" ".join(block)))
            block.clear()

    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if _FENCE.match(line):
            flush()
            fenced = not fenced
            example = fenced and "for example" in last_prose.lower()
            continue
        if fenced:
            if not example:
                found.append((number, line))
            continue
        if stripped.startswith("|"):
            flush()
            found.append((number, line))
            continue
        if not stripped or stripped.startswith("#") or re.match(r"([-*]|\d+\.) ", stripped):
            flush()
        if stripped and not stripped.startswith("#"):
            if not block:
                start = number
            block.append(stripped)
            last_prose = stripped
    flush()
    return found


@functools.cache
def row_text(name: str) -> str:
    """What a row of docs/results.md says (figures and provenance), commas dropped; '' if none."""
    for record_name, record in report.records():
        if record_name == name:
            said = [
                *record["figures"].keys(),
                *record["figures"].values(),
                *record["meta"].values(),
            ]
            return " ".join(map(str, said)).replace(",", "")
    return ""


def unlinked_figures(doc: str, text: str) -> list[str]:
    """'doc:line: figures | passage' for each passage stating a measured figure that the rows of
    docs/results.md it links to do not hold (every figure, where it links none)."""
    bad = []
    for line, passage in passages(text):
        backing = " ".join(row_text(name) for name in CITED_ROW.findall(passage))
        plain = re.sub(r"`[^`\n]*`", "`code`", passage).replace("**", "")
        for allowed_doc, figure in SETTINGS:
            if allowed_doc == doc:
                plain = plain.replace(figure, "")
        measuring = MEASURING.search(plain)
        figures = [
            m.group(0).strip()
            for m in FIGURE.finditer(plain)
            if (m.group("unit") in RATES or measuring or TARGETED.match(plain, m.end()))
            and not BOUND.search(plain[: m.start()])
            and not BOUND_AFTER.match(plain, m.end())
            and _number(m.group(0)) not in backing
        ]
        if figures:
            bad.append(f"{doc}:{line}: {', '.join(figures)} | {passage.strip()[:160]}")
    return bad


def _number(figure: str) -> str:
    found = re.search(_NUMBER, figure)
    return found.group(0).replace(",", "") if found else figure


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


def test_no_doc_states_a_measured_figure_without_its_row_in_results_md() -> None:
    bad = [
        problem
        for doc in DOCS
        if doc.name != "results.md"
        for problem in unlinked_figures(doc.name, doc.read_text())
    ]
    assert not bad, (
        "measured figures without a link to their row of docs/results.md (record the "
        "benchmark and link the row, or say what the code guarantees instead):\n" + "\n".join(bad)
    )


@pytest.mark.parametrize(
    ("text", "flagged"),
    [
        ("The swap took 0.34 s with webhooks.", ["0.34 s"]),
        ("Idle, ours served 950.7 req/s.", ["950.7 req/s"]),
        ("| back after `kill -9` | 7.0 s (target <= 10 s) | - |", ["7.0 s"]),
        (
            "```\nnormal client: p50 3.5 ms, p99 25.8 ms, RSS 216 MB\n```",
            ["3.5 ms", "25.8 ms", "216 MB"],
        ),
        ("Each move took 1\u20133.5 s and the web app 2.9x less.", ["1\u20133.5 s", "2.9x"]),
        ("On the 2-core development VM it read 95.5% ([results](results.md#demo-2026-12-04)).", []),
        (
            "On the 2-core development VM it read 97.5% ([results](results.md#demo-2026-12-04)).",
            ["97.5%"],
        ),
        ("Requests time out after `CAPTCHAOPS_DEADLINE` (10 s) of waiting.", []),
        ("The server's peak RSS must stay at most 300 MB.", []),
        ("A run counts as stalled when a collection takes 10 s or more.", []),
        ("The lines read, for example:\n\n```\nALERT: 61.0% is 34 points below, p99 9 ms\n```", []),
    ],
)
def test_what_counts_as_a_measured_figure(text: str, flagged: list[str]) -> None:
    found = [
        problem.split(": ", 1)[1].split(" | ")[0] for problem in unlinked_figures("x.md", text)
    ]
    assert found == ([", ".join(flagged)] if flagged else [])


# Diary wording: a guide says what the system does now, not what happened on the way there.
DIARY = re.compile(
    r"\b(?:we (?:found|tried|measured|saw)|this round\b(?! trip)|since then|last run|"
    r"earlier runs?|the first run|until now|used to|before this change|after this change)\b",
    re.I,
)


def test_no_doc_reads_like_a_diary() -> None:
    found = [
        f"{doc.name}:{number}: {line.strip()[:120]}"
        for doc in DOCS
        if doc.name != "results.md"
        for number, line in enumerate(doc.read_text().splitlines(), 1)
        if DIARY.search(line)
    ]
    assert not found, "history in a guide (say what the system does instead):\n" + "\n".join(found)


def test_the_readme_starts_with_two_commands() -> None:
    first_screen = (ROOT / "README.md").read_text().split("\n---", 1)[0]
    commands = [
        line.split("#", 1)[0].strip()
        for block in re.findall(r"```\w*\n(.*?)```", first_screen, re.S)
        for line in block.splitlines()
        if line.strip()
    ]
    assert commands == ["make demo", "make test"]


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
