"""What `report` writes: every record value in matrix.md escaped, matrix.md and summary.json each written whole
with one run id, and nothing in --results (a leftover journal) able to make the report rename or delete a file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from test_report import REF_VERSION, ok, run_report, write_records

from opensci_patch._util import faults
from opensci_patch._util.procs import child_env
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


# --- the two files: each written whole, one run id, no journal -----------------------------------------------


def _run_ids(results: Path) -> tuple[str | None, str | None]:
    md = re.search(r"Report run `([^`]+)`", (results / "matrix.md").read_text())
    return (md[1] if md else None), json.loads((results / "summary.json").read_text()).get("run_id")


def _cli(recs: Path, results: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = child_env({faults.FAULT_VAR: fault} if fault else {})
    cmd = [sys.executable, "-m", "opensci_patch.cli", "report", "--records", str(recs), "--results", str(results)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_a_report_killed_between_its_two_writes_is_told_and_rewritten_by_the_next(tmp_path: Path):
    """matrix.md is written first, summary.json (what the next report compares with) last: a kill between the two
    leaves summary.json of the last whole run; the next report says the two differ and writes both again."""
    recs, results = tmp_path / "records", tmp_path / "results"
    write_records(recs, [ok(REF_VERSION), ok("5.2.0")])
    assert _cli(recs, results).returncode == 0
    first = _run_ids(results)
    assert first[0] is not None and first[0] == first[1]
    write_records(recs, [ok("5.3.0")])
    killed = _cli(recs, results, "report.between:SIGKILL")
    assert killed.returncode == -9, killed.stderr
    md_id, summary_id = _run_ids(results)
    assert summary_id == first[1] and md_id != first[0]
    again = _cli(recs, results)
    assert again.returncode == 0 and "two different report runs" in again.stdout + again.stderr
    now = _run_ids(results)
    assert now[0] == now[1] not in first
    assert sorted(p.name for p in results.iterdir() if p.name.startswith(".")) == [".report.lock"]


def test_a_journal_left_in_results_renames_nothing(tmp_path: Path):
    """An old version's `.report-pending.json` (or one committed in a pull request) is never followed."""
    (tmp_path / "elsewhere").mkdir()
    victim, config = tmp_path / "elsewhere" / "victim.txt", tmp_path / "elsewhere" / "config.toml"
    victim.write_text("precious")
    config.write_text("old config")
    results = tmp_path / "results"
    results.mkdir()
    (results / "notes.txt").write_text("mine")
    renames = [["../elsewhere/victim.txt", "../elsewhere/config.toml"], [str(victim), "x"], ["notes.txt", "kept.txt"]]
    (results / ".report-pending.json").write_text(json.dumps({"renames": renames}))
    bad, _, _ = run_report(tmp_path, [ok(REF_VERSION)])
    assert bad == 0
    assert (victim.read_text(), config.read_text()) == ("precious", "old config")
    assert (results / "notes.txt").read_text() == "mine" and not (results / "kept.txt").exists()
    assert not (results / "x").exists()
