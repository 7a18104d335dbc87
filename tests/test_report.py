"""Verdicts and tables from cell records (pure functions: synthetic records suffice)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opensci_patch import report
from opensci_patch.matrix import Cell, expectation


def record(version: str, model: str, *, sha: str = "a" * 64, status: str = "ok", gen=(1, 2, 3)) -> dict:
    cell = Cell(version, "cpu", model)
    rec = {
        "cell": {
            "transformers": version,
            "torch": "cpu",
            "model": model,
            "dtype": "float32",
            "attn": "eager",
            "device": "cpu",
            "id": cell.id,
        },
        "expected": {"outcome": expectation(cell).outcome, "reason": expectation(cell).reason},
        "status": status,
        "environment": {"transformers": version, "torch": "2.13.0+cpu"},
    }
    if status == "ok":
        rec |= {
            "logits_sha256": sha,
            "generation": {"ids": list(gen), "text": " Paris."},
            "target": {"token": " Paris", "logit": 14.5, "rank": 1},
            "topk": [{"id": 5, "token": " Paris", "logit": 14.5}],
        }
    else:
        rec["error"] = {"type": "ImportError", "message": "cannot import name 'LossKwargs'"}
    return rec


def verdicts(recs: list[dict]) -> dict[str, str]:
    return {r["cell"]: r["status"] for r in report.rows(recs)}


def test_bit_identical_patched_cell_passes():
    recs = [record("4.48.0", "patched"), record("5.2.0", "patched")]
    assert set(verdicts(recs).values()) == {"pass"}


def test_patched_cell_with_other_logits_fails_even_if_it_predicts_paris():
    recs = [record("4.48.0", "patched"), record("5.2.0", "patched", sha="b" * 64)]
    assert verdicts(recs)[Cell("5.2.0", "cpu", "patched").id] == "FAIL"


def test_patched_cell_with_other_generation_fails():
    recs = [record("4.48.0", "patched"), record("5.2.0", "patched", gen=(1, 2, 4))]
    assert verdicts(recs)[Cell("5.2.0", "cpu", "patched").id] == "FAIL"


def test_original_load_error_is_an_expected_failure():
    recs = [record("4.48.0", "patched"), record("5.2.0", "original", status="load-error")]
    assert verdicts(recs)[Cell("5.2.0", "cpu", "original").id] == "expected-fail"


def test_strict_xfail_reports_an_unexpected_pass():
    """5.0 patched is declared to fail; if it matches the reference, upstream changed: XPASS."""
    recs = [record("4.48.0", "patched"), record("5.0.0", "patched")]
    assert verdicts(recs)[Cell("5.0.0", "cpu", "patched").id] == "XPASS"


def test_env_error_is_an_error_not_an_expected_failure():
    recs = [record("4.48.0", "patched"), record("5.0.0", "original", status="env-error")]
    assert verdicts(recs)[Cell("5.0.0", "cpu", "original").id] == "error"


def test_missing_reference_cell_fails_rather_than_passes():
    assert verdicts([record("5.2.0", "patched")])[Cell("5.2.0", "cpu", "patched").id] == "FAIL"


@pytest.mark.parametrize(("bad_version", "sha", "expect_bad"), [("5.2.0", "a" * 64, 0), ("5.2.0", "c" * 64, 1)])
def test_write_report_counts_bad_cells_and_writes_tables(tmp_path: Path, bad_version, sha, expect_bad):
    records = tmp_path / "records"
    records.mkdir()
    for rec in [record("4.48.0", "patched"), record(bad_version, "patched", sha=sha)]:
        (records / f"{rec['cell']['id']}.json").write_text(json.dumps(rec))
    bad = report.write_report(records, tmp_path / "results", log=lambda *a: None)
    assert bad == expect_bad
    md = (tmp_path / "results" / "matrix.md").read_text()
    assert "| 5.2.0" in md and ("FAIL" in md) == bool(expect_bad)


def test_report_lists_newly_broken_cells_first(tmp_path: Path):
    records = tmp_path / "records"
    records.mkdir()
    good, moved = record("4.48.0", "patched"), record("5.2.0", "patched")
    for rec in (good, moved):
        (records / f"{rec['cell']['id']}.json").write_text(json.dumps(rec))
    report.write_report(records, tmp_path / "results", log=lambda *a: None)
    moved["logits_sha256"] = "d" * 64
    (records / f"{moved['cell']['id']}.json").write_text(json.dumps(moved))
    report.write_report(records, tmp_path / "results", log=lambda *a: None)
    md = (tmp_path / "results" / "matrix.md").read_text()
    assert "### Newly broken" in md
    assert md.index("### Newly broken") < md.index("| transformers")


def test_expectations_follow_the_declared_upstream_behaviour():
    assert expectation(Cell("4.48.0", model="original")).outcome == "xfail"
    assert expectation(Cell("5.0.0", model="patched")).outcome == "xfail"
    assert expectation(Cell("5.1.0", model="patched")).outcome == "xfail"
    assert expectation(Cell("5.0.0", model="patched+init")).outcome == "pass"
    assert {expectation(Cell(v, model="generated")).outcome for v in ("4.48.0", "5.0.0", "5.2.0")} == {"pass"}
    assert expectation(Cell("5.2.0", model="structural")).outcome == "xfail"
    assert expectation(Cell("4.57.6", model="structural")).outcome == "pass"
    assert expectation(Cell("5.23.0", model="patched")).outcome == "pass"


def _with_attn(rec: dict, attn: str, device_name: str | None = None) -> dict:
    rec["cell"] = rec["cell"] | {"attn": attn, "id": rec["cell"]["id"].replace("-eager", f"-{attn}")}
    if device_name:
        rec["cell"] |= {"torch": "cuda", "device": "cuda", "id": rec["cell"]["id"].replace("-cpu-", "-cuda-")}
    if device_name:
        rec["environment"]["device_name"] = device_name
    return rec


def test_each_attention_is_compared_with_its_own_reference_and_shown_in_its_own_row(tmp_path: Path):
    recs = [
        _with_attn(record("4.48.0", "patched", sha="e" * 64), "eager", "NVIDIA H100 80GB HBM3"),
        _with_attn(record("4.48.0", "patched", sha="s" * 64), "sdpa", "NVIDIA H100 80GB HBM3"),
        _with_attn(record("5.2.0", "patched", sha="e" * 64), "eager", "NVIDIA H100 80GB HBM3"),
        _with_attn(record("5.2.0", "patched", sha="e" * 64), "sdpa", "NVIDIA H100 80GB HBM3"),  # != sdpa ref
    ]
    table = report.rows(recs)
    got = {(r["transformers"], r["attn"]): r["status"] for r in table}
    assert got == {("4.48.0", "eager"): "pass", ("4.48.0", "sdpa"): "pass", ("5.2.0", "eager"): "pass",
                   ("5.2.0", "sdpa"): "FAIL"}  # fmt: skip
    assert {r["device"] for r in table} == {"cuda: NVIDIA H100 80GB HBM3"}
    cpu = record("4.48.0", "patched")
    cpu["environment"]["device_name"] = "x86_64"  # what capture records on a CPU
    assert report.rows([cpu])[0]["device"] == "cpu"
    text = report.markdown_table(table)
    assert [h.strip() for h in text.splitlines()[0].strip("|").split("|")][3:5] == ["dtype", "attn"]
    assert sum(" sdpa " in line for line in text.splitlines()) == 2
