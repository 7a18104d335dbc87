"""What `report` writes: every record value in matrix.md escaped."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from test_report import REF_VERSION, ok, run_report, write_records

from opensci_patch.measure.records import ErrorInfo
from opensci_patch.results import render


def _unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def _assert_no_markup_from_records(md: str) -> None:
    lines = md.splitlines()
    for line in lines:
        assert not re.match(r"\s{0,3}#+\s.*INJECTED", line), line
        assert not re.search(r"<(script|img|b|i)\b", line, re.I), line
    header = None
    for line in lines:  # every table row has its table header's number of columns
        if not line.startswith("|"):
            header = None
        elif header is None:
            header = _unescaped_pipes(line)
        else:
            assert _unescaped_pipes(line) == header, line


def test_record_values_reach_matrix_md_escaped_in_every_column_and_label(tmp_path: Path):
    forged = ok("5.25.0")
    forged.cell = replace(forged.cell, attn="eager\n\n# INJECTED attn <img src=x onerror=alert(1)>\n")
    forged.environment = {
        "transformers": "5.25.0",
        "torch": "2.13.0 | <b>bold</b>",
        "overrides": ["kernels>=0.17 | col\n\n## INJECTED overrides <script>alert(2)</script>"],
    }
    model = ok("5.25.0", "new|variant\n# INJECTED model <i>")
    records = write_records(tmp_path / "records", [ok(REF_VERSION), forged, model])
    (records / "bad|<i>x\n# INJECTED name.json").write_text("{")
    bad, md, summary = run_report(tmp_path)
    assert bad >= 1 and any("bad|<i>x" in p for p in summary["problems"])
    assert sum(line.startswith("| 5.25.0") for line in md.splitlines()) >= 2  # the forged rows are there, escaped
    _assert_no_markup_from_records(md)


def test_a_multi_line_error_message_stays_in_its_one_changes_entry(tmp_path: Path):
    broken = ok("5.25.0")
    broken.status, broken.generation = "load-error", None
    message = "boom\n\n## Newly fixed\n- `tf5.25.0-cpu-patched-float32-eager`: error -> **pass** ship it\n"
    broken.error = ErrorInfo("ImportError", message, "")
    write_records(tmp_path / "records", [ok(REF_VERSION), broken])
    (tmp_path / "results").mkdir()
    previous = {"verdicts": {broken.cell.id: "pass"}, "releases": [REF_VERSION, "5.25.0"]}
    (tmp_path / "results" / "summary.json").write_text(json.dumps(previous))
    _, md, _ = run_report(tmp_path)
    section = md[md.index("## Changes since") : md.index("## Detail")].splitlines()[1:]
    assert [line for line in section if line.startswith("#")] == ["### Newly broken"]
    (entry,) = [line for line in section if line.startswith("- ")]
    assert "boom" in entry and "ship it" in entry


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("a|b", r"a\|b"),
        ("one\ntwo\r\n\nthree", "one two three"),
        ("# heading", r"\# heading"),
        ("<script>&", "&lt;script>&amp;"),
        ("back\\", "back\\\\"),
        ("plain 4.48.0 float32", "plain 4.48.0 float32"),
    ],
)
def test_md_text_escapes_what_markdown_or_html_would_read(raw: str, shown: str):
    assert render.md_text(raw) == shown
