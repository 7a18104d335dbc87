"""What `report` reads: record files that are not files, too deep or too big, two records of one cell, and a
--results that is the records directory. Each is a problem line or one line and exit 2, never a hang or a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from test_report import REF_VERSION, STEPS, ok, run_report, write_records

from opensci_patch.measure import records
from opensci_patch.results import report


def _cli_report(records_dir: Path, results: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    def limit_memory():  # a reader of /dev/zero stops at 3 GB instead of taking the machine's memory
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    cmd = [sys.executable, "-m", "opensci_patch.cli", "report", "--records", str(records_dir)]
    cmd += ["--results", str(results)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=limit_memory)


# --- record files that are not regular files, or too deep, or too big --------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero"])
def test_a_record_that_is_a_fifo_or_a_device_is_a_problem_not_read(tmp_path: Path, kind: str):
    recs = write_records(tmp_path / "records", [ok(REF_VERSION)])
    if kind == "fifo":
        os.mkfifo(recs / "zz.json")
    else:
        (recs / "zz.json").symlink_to("/dev/zero")
    try:
        proc = _cli_report(recs, tmp_path / "results", timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"report blocked on a records *.json that is a {kind}")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    problems = json.loads((tmp_path / "results" / "summary.json").read_text())["problems"]
    assert len(problems) == 1 and "zz.json" in problems[0] and "not a regular file" in problems[0]


def test_a_record_larger_than_the_bound_is_refused_without_reading_it(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 4096)
    big = tmp_path / "big.json"
    big.write_text(records.Record().to_json()[:-2] + " " * 5000 + "}\n")  # a valid record, padded past the bound
    with pytest.raises(records.RecordError, match=r"big.json: larger than 4096 bytes"):
        records.load(big)


def test_a_deeply_nested_json_record_is_a_problem_not_a_crash(tmp_path: Path):
    recs = write_records(tmp_path / "records", [ok(REF_VERSION)])
    n = 200_000
    (recs / "deep.json").write_text("[" * n + "]" * n)
    (recs / "deep-field.json").write_text('{"schema_version": 2, "settings": ' + "[" * n + "]" * n + "}")
    bad, md, summary = run_report(tmp_path)
    assert bad == 2
    assert sorted(Path(p.split(":")[0]).name for p in summary["problems"]) == ["deep-field.json", "deep.json"]
    assert all("nested too deeply" in p for p in summary["problems"]) and "deep.json" in md


# --- two records of one cell ---------------------------------------------------------------------------------


def _reference_claimed_twice() -> list:
    """The real reference cell, a second record of the same cell (another id string, other hashes) and a 5.25.0
    cell that agrees with the second one: whichever reference won, the 5.25.0 verdict would follow it."""
    other = ["ff" * 32] * len(STEPS)
    fake = ok(REF_VERSION, sha="f" * 64, steps=other)
    fake.cell = replace(fake.cell, id=fake.cell.id + "-copy")
    return [ok(REF_VERSION), fake, ok("5.25.0", sha="f" * 64, steps=other)]


def test_two_records_of_one_cell_are_a_duplicate_whatever_their_id_and_file_names(tmp_path: Path):
    ref, fake, later = _reference_claimed_twice()
    got = []
    for names in (["a.json", "z.json", "m.json"], ["z.json", "a.json", "m.json"]):
        d = tmp_path / names[0]
        write_records(d / "records", [ref, fake, later], names)
        bad, _, summary = run_report(d)
        got.append(summary["verdicts"][later.cell.id])
        assert bad >= 2  # the duplicate problem, and no pass for 5.25.0
        (dup,) = [p for p in summary["problems"] if "records for this cell" in p]
        assert "a.json" in dup and "z.json" in dup
    assert got[0] == got[1] == "cannot-judge"  # no trusted reference: neither pass nor FAIL, in both namings


def test_a_duplicate_reference_never_leaks_its_environment_into_the_row(tmp_path: Path):
    """The shown row of an ambiguous cell is the same whichever file sorts first (only the cell's own fields)."""
    ref, fake, _ = _reference_claimed_twice()
    fake.environment = {**fake.environment, "torch": "9.9.9", "overrides": ["kernels>=0.17"]}
    rows = []
    for names in (["a.json", "z.json"], ["z.json", "a.json"]):
        loaded = report.load_records(write_records(tmp_path / names[0], [ref, fake], names))
        rows.append(report.build(loaded, None).table)
    assert rows[0] == rows[1] and len(rows[0]) == 1 and rows[0][0].status == "error"


# --- --results equal to --records ---------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["same", "link"])
def test_results_that_is_the_records_directory_is_refused_up_front(tmp_path: Path, alias: str):
    recs = write_records(tmp_path / "records", [ok(REF_VERSION)])
    results = recs
    if alias == "link":
        results = tmp_path / "link"
        results.symlink_to(recs)
    proc = _cli_report(recs, results)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "--results" in line and "--records" in line
    assert sorted(p.name for p in recs.iterdir()) == [f"{ok(REF_VERSION).cell.id}.json"]  # nothing written


def test_a_previous_summary_that_is_a_fifo_is_refused_not_opened(tmp_path: Path):
    recs = write_records(tmp_path / "records", [ok(REF_VERSION)])
    (tmp_path / "results").mkdir()
    os.mkfifo(tmp_path / "results" / "summary.json")
    try:
        proc = _cli_report(recs, tmp_path / "results", timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("report blocked on a summary.json that is a FIFO")
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "summary.json: not a regular file" in line
