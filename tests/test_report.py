"""The report's rules, on small records built here (records.Record / records.error_record)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import running_placeholder

from opensci_patch._util import fs
from opensci_patch._util.errors import DestinationError, OpensciPatchError
from opensci_patch.matrix.spec import REFERENCE, VARIANTS, Cell, Variant
from opensci_patch.measure import records
from opensci_patch.measure.records import CellInfo, Expected, Generation, KVCheck, Record, Target, TopToken
from opensci_patch.results import judge, pair, report
from opensci_patch.results import plot as report_plot

PASS = Expected("pass", "")
XFAIL = Expected("xfail", "declared to fail for a test")
REF_VERSION, REF_MODEL = REFERENCE
STEPS = ["s0" * 32, "s1" * 32, "s2" * 32, "s3" * 32]


def cell_of(version: str, model: str = REF_MODEL, attn: str = "eager", torch: str = "cpu") -> CellInfo:
    return CellInfo.of(Cell(version, torch, model, "float32", attn))


def ok(version: str, model: str = REF_MODEL, *, expected=PASS, sha="a" * 64, steps=STEPS, ids=(5, 6, 7), **cell):
    """A finished cell whose first logits hash to `sha` and whose decode steps hash to `steps`."""
    return Record(
        settings={"dtype": "float32", "attn": cell.get("attn", "eager"), "device": "cpu"},
        environment={"transformers": version, "torch": "2.13.0+cpu"},
        model={"patched": model != "original"},
        target=Target(" Paris", 5, 14.5, 1),
        topk=(TopToken(5, " Paris", 14.5),),
        logits_sha256=sha,
        generation=Generation(tuple(ids), " Paris.", tuple(steps), KVCheck(True, 1e-4, 0.0, None, "")),
        cell=cell_of(version, model, **cell),
        expected=expected,
    )


def failed(version: str, model: str = REF_MODEL, status: str = "load-error", *, expected=PASS) -> Record:
    rec = records.error_record(cell_of(version, model), status, "ImportError", "cannot import name 'X'", "tb")
    rec.expected = expected
    return rec


def mismatch(version: str, model: str = REF_MODEL, *, expected=PASS) -> Record:
    rec = ok(version, model, expected=expected)
    rec.status = records.Status.GENERATE_MISMATCH
    detail = "step 1: cached logits differ by 3.2 from the no-cache recomputation"
    rec.generation = replace(rec.generation, kv_check=KVCheck(False, 1e-4, 3.2, 1, detail))
    return rec


def verdicts(recs: list[Record]) -> dict[str, tuple[str, str]]:
    return {r.cell: (r.status, r.why) for r in judge.rows(recs)}


def vid(version: str, model: str = REF_MODEL) -> str:
    return cell_of(version, model).id


def write_records(d: Path, recs: list[Record], names: list[str] | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i, rec in enumerate(recs):
        fs.write_atomic(d / (names[i] if names else f"{rec.cell_id}.json"), rec)
    return d


def run_report(tmp_path: Path, recs: list[Record] | None = None, **kw) -> tuple[int, str, dict]:
    if recs is not None:
        write_records(tmp_path / "records", recs)
    bad = report.write_report(tmp_path / "records", tmp_path / "results", log=lambda *a: None, **kw)
    res = tmp_path / "results"
    return bad, (res / "matrix.md").read_text(), json.loads((res / "summary.json").read_text())


# --- verdicts ---------------------------------------------------------------------------------------------------


def test_bit_identical_cell_passes_and_different_first_logits_fail():
    got = verdicts([ok(REF_VERSION), ok("5.2.0"), ok("5.23.0", sha="b" * 64)])
    assert got[vid("5.2.0")] == ("pass", "")
    assert got[vid("5.23.0")] == ("FAIL", "logits differ from the reference cell")


def test_same_first_logits_but_a_different_decode_step_fails_naming_the_step():
    """The 5.24 failure: the prompt's forward is bit-identical, the KV-cache decode loop is not."""
    steps = [*STEPS[:3], "ff" * 32]
    got = verdicts([ok(REF_VERSION), ok("5.24.0", steps=steps)])
    assert got[vid("5.24.0")] == ("FAIL", "decode step 3 logits differ from the reference cell")
    row = next(r for r in judge.rows([ok(REF_VERSION), ok("5.24.0", steps=steps)]) if r.transformers == "5.24.0")
    assert row.bit_identical is True and row.decode_steps.startswith("decode step 3")


def test_step_0_alone_differing_is_not_a_failure_but_step_1_is():
    """Step 0 is the prompt forward, compared as the first logits: 5.x generate computes only its last
    position (logits_to_keep=1), 4.x all of them, which rounds the head's matmul differently."""
    got = verdicts([ok(REF_VERSION), ok("5.2.0", steps=["ff" * 32, *STEPS[1:]]), ok("5.23.0", sha="b" * 64)])
    assert got[vid("5.2.0")] == ("pass", "")
    assert got[vid("5.23.0")][0] == "FAIL"  # a different prompt forward is still caught, by the first logits
    steps = [STEPS[0], "ff" * 32, *STEPS[2:]]
    assert verdicts([ok(REF_VERSION), ok("5.2.0", steps=steps)])[vid("5.2.0")] == (
        "FAIL",
        "decode step 1 logits differ from the reference cell",
    )


def test_fewer_decode_steps_than_the_reference_fail():
    status, why = verdicts([ok(REF_VERSION), ok("5.2.0", steps=STEPS[:2])])[vid("5.2.0")]
    assert status == "FAIL" and "2 decode steps" in why and str(len(STEPS)) in why


def test_other_greedy_tokens_fail_even_with_equal_step_hashes():
    assert verdicts([ok(REF_VERSION), ok("5.2.0", ids=(5, 6, 8))])[vid("5.2.0")][0] == "FAIL"


def test_generate_mismatch_is_fail_with_its_detail_or_expected_fail_when_declared():
    got = verdicts([ok(REF_VERSION), mismatch("5.24.0"), mismatch("5.23.0", expected=XFAIL)])
    status, why = got[vid("5.24.0")]
    assert status == "FAIL" and why.startswith("generate-mismatch: step 1: cached logits differ")
    assert got[vid("5.23.0")] == ("expected-fail", f"{why} ({XFAIL.reason})")


def test_nonfinite_logits_and_model_errors_fail_when_expected_to_pass():
    nan = failed("5.2.0", status="nonfinite-logits")
    got = verdicts([ok(REF_VERSION), nan, failed("5.23.0")])
    assert got[vid("5.2.0")][0] == "FAIL" and got[vid("5.2.0")][1].startswith("nonfinite-logits")
    assert got[vid("5.23.0")] == ("FAIL", "load-error: ImportError: cannot import name 'X'")


def test_declared_expectation_in_the_record_decides_between_expected_fail_fail_pass_and_xpass():
    """The report judges against what the cell declared when it ran, not against a table of its own."""
    same = [ok(REF_VERSION), ok("5.2.0", expected=XFAIL), failed("5.23.0", expected=XFAIL)]
    got = verdicts(same)
    assert got[vid("5.2.0")][0] == "XPASS" and XFAIL.reason in got[vid("5.2.0")][1]
    assert got[vid("5.23.0")] == ("expected-fail", f"load-error: ImportError: cannot import name 'X' ({XFAIL.reason})")
    flipped = [ok(REF_VERSION), ok("5.2.0", expected=PASS), failed("5.23.0", expected=PASS)]
    assert [verdicts(flipped)[vid(v)][0] for v in ("5.2.0", "5.23.0")] == ["pass", "FAIL"]


@pytest.mark.parametrize("status", ["env-error", "crash", "hotfix-error"])
def test_a_cell_that_could_not_run_is_an_error_even_when_a_failure_was_expected(status: str):
    assert verdicts([ok(REF_VERSION), failed("5.0.0", status=status, expected=XFAIL)])[vid("5.0.0")][0] == "error"


def test_without_a_reference_cell_nothing_passes():
    """No release where the reference variant ran ok, or none on the release --reference-release names."""
    init = "patched+init"
    assert verdicts([failed(REF_VERSION), ok("5.2.0", init)])[vid("5.2.0", init)][0] == "cannot-judge"
    table = judge.rows([failed(REF_VERSION), ok("5.2.0")], release=REF_VERSION)
    assert {r.transformers: r.status for r in table} == {REF_VERSION: "FAIL", "5.2.0": "cannot-judge"}
    assert "cannot-judge" in judge.BAD


def test_each_attention_and_device_is_compared_with_its_own_reference():
    recs = [ok(REF_VERSION, sha="e" * 64), ok(REF_VERSION, sha="f" * 64, attn="sdpa"),
            ok("5.2.0", sha="e" * 64), ok("5.2.0", sha="e" * 64, attn="sdpa")]  # fmt: skip
    got = {(r.transformers, r.attn): r.status for r in judge.rows(recs)}
    assert got[("5.2.0", "eager")] == "pass" and got[("5.2.0", "sdpa")] == "FAIL"
    gpu = ok(REF_VERSION, torch="cuda")
    gpu.environment["device_name"] = "NVIDIA H100 80GB HBM3"
    cpu = ok(REF_VERSION)
    cpu.environment["device_name"] = "x86_64"  # what capture records on a CPU
    assert [r.device for r in judge.rows([cpu, gpu])] == ["cpu", "cuda: NVIDIA H100 80GB HBM3"]


# --- ambiguity --------------------------------------------------------------------------------------------------


def test_reference_choice_does_not_depend_on_file_names_or_order(tmp_path: Path):
    """A reference-looking record that sorts first must not win: two records for one cell are refused."""
    recs = [ok(REF_VERSION), ok(REF_VERSION, sha="z" * 64), ok("5.2.0")]
    results = []
    for i, names in enumerate((["0.json", "1.json", "2.json"], ["b.json", "a.json", "c.json"])):
        order = list(range(3))
        random.Random(i).shuffle(order)
        write_records(tmp_path / f"r{i}", [recs[j] for j in order], [names[j] for j in order])
        loaded = report.load_records(tmp_path / f"r{i}")
        results.append([(r.cell, r.status) for r in judge.rows(loaded.records, loaded.sources)])
    assert results[0] == results[1]
    got = dict(results[0])
    assert got[vid(REF_VERSION)] == "error"
    assert got[vid("5.2.0")] == "cannot-judge"  # no trusted reference, so no pass


def test_duplicate_records_for_one_cell_are_an_error_listed_with_both_files(tmp_path: Path):
    write_records(tmp_path / "records", [ok(REF_VERSION), ok("5.2.0"), ok("5.2.0")],
                  [f"{vid(REF_VERSION)}.json", "first.json", "second.json"])  # fmt: skip
    bad, md, summary = run_report(tmp_path)
    assert bad == 1
    assert summary["verdicts"][vid("5.2.0")] == "error"
    (line,) = summary["problems"]
    assert vid("5.2.0") in line and "first.json" in line and "second.json" in line
    assert "## Problems" in md and "first.json" in md


def test_a_running_placeholder_is_never_finished_not_the_previous_result(tmp_path: Path):
    placeholder = running_placeholder(cell_of("5.2.0"), expected=PASS)
    bad, md, summary = run_report(tmp_path, [ok(REF_VERSION), placeholder])
    assert bad == 1
    assert summary["verdicts"][vid("5.2.0")] == "error"
    assert any(vid("5.2.0") in p and "never finished" in p for p in summary["problems"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"schema_version": 2, "status": ', "truncated"),
        ('{"status": "ok"}', "no schema_version"),
        ('{"schema_version": 99}', "schema_version 99"),
    ],
)
def test_unreadable_or_unknown_schema_records_are_problems_and_fail_the_run(tmp_path: Path, content, message):
    write_records(tmp_path / "records", [ok(REF_VERSION)])
    (tmp_path / "records" / "broken.json").write_text(content)
    bad, md, summary = run_report(tmp_path)
    assert bad == 1
    assert len(summary["problems"]) == 1 and "broken.json" in summary["problems"][0]
    assert message in summary["problems"][0] and message in md
    assert summary["counts"] == {"pass": 1}


def test_a_capture_record_without_a_cell_is_a_problem_not_skipped(tmp_path: Path):
    stray = ok(REF_VERSION)
    stray.cell = stray.expected = None
    write_records(tmp_path / "records", [ok(REF_VERSION)])
    fs.write_atomic(tmp_path / "records" / "stray.json", stray)
    bad, _, summary = run_report(tmp_path)
    assert bad == 1 and "stray.json" in summary["problems"][0]


# --- outputs ----------------------------------------------------------------------------------------------------


def _md_table(md: str, first_header: str) -> list[list[str]]:
    start = md.index(f"| {first_header}")
    lines = []
    for line in md[start:].splitlines():
        if not line.startswith("|"):
            break
        lines.append([c.strip() for c in line.strip("|").split("|")])
    return [lines[0], *lines[2:]]


def test_matrix_md_and_summary_json_agree(tmp_path: Path):
    recs = [ok(REF_VERSION), ok("5.2.0", sha="b" * 64), failed("5.2.0", "original", expected=XFAIL),
            mismatch("5.24.0"), failed("5.24.0", "structural", "crash")]  # fmt: skip
    bad, md, summary = run_report(tmp_path, recs)
    header, *grid_rows = _md_table(md, "transformers")
    assert header[1:] == list(VARIANTS)
    (grid,) = summary["grid"].values()
    assert {r[0]: dict(zip(header[1:], r[1:], strict=True)) for r in grid_rows} == grid
    detail_header, *detail = _md_table(md[md.index("## Detail") :], "transformers")
    col = {h: i for i, h in enumerate(detail_header)}
    md_verdicts = {(r[col["transformers"]], r[col["model"]]): r[col["status"]] for r in detail}
    assert md_verdicts == {(r["transformers"], r["model"]): r["status"] for r in summary["rows"]}
    assert {r["cell"]: r["status"] for r in summary["rows"]} == summary["verdicts"]
    counts = re.search(r"Counts: (.*)", md)[1]
    assert counts == ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
    assert bad == sum(summary["counts"].get(k, 0) for k in judge.BAD) > 0


def test_grid_has_one_row_per_release_a_column_per_variant_and_says_missing():
    table = judge.rows([ok(REF_VERSION), failed("5.2.0", "original", expected=XFAIL)])
    (cells,) = judge.grid(table).values()
    assert list(cells) == [REF_VERSION, "5.2.0"]
    assert list(cells["5.2.0"]) == list(VARIANTS)
    assert cells["5.2.0"]["original"] == "expected-fail"
    assert cells["5.2.0"][REF_MODEL] == report_plot.MISSING


def test_a_new_variant_in_matrix_models_reaches_the_grid_and_the_plot(monkeypatch):
    declared = {**VARIANTS, "brand-new": Variant("brand-new", (), "a new variant")}
    for module in (judge, report_plot):  # rows order by it; the grid's columns and the plot's markers follow it
        monkeypatch.setattr(module, "VARIANTS", declared)
    table = judge.rows([ok(REF_VERSION), ok("5.2.0", "brand-new")])
    (cells,) = judge.grid(table).values()
    assert list(cells[REF_VERSION])[-1] == "brand-new"
    series = {model: pts for model, _, pts in report_plot.paris_series(table)}
    assert set(series) == set(VARIANTS) | {"brand-new"} and series["brand-new"] == [(1, 14.5)]
    # a record of a variant the matrix no longer lists is still shown, not dropped
    fewer = {m: v for m, v in VARIANTS.items() if m != "generated"}
    for module in (judge, report_plot):
        monkeypatch.setattr(module, "VARIANTS", fewer)
    assert "generated" in report_plot.columns(judge.rows([ok(REF_VERSION, "generated")]))


def test_releases_new_since_the_committed_summary_are_marked(tmp_path: Path):
    run_report(tmp_path, [ok(REF_VERSION), ok("5.2.0")])
    write_records(tmp_path / "records", [ok("5.24.0")])
    _, md, summary = run_report(tmp_path)
    assert summary["new_releases"] == ["5.24.0"]
    grid_releases = [r[0] for r in _md_table(md, "transformers")[1:]]
    assert grid_releases == [REF_VERSION, "5.2.0", "5.24.0 (new)"]
    _, md, summary = run_report(tmp_path)  # now 5.24.0 is in the summary the run found
    assert summary["new_releases"] == [] and "(new)" not in md


def test_new_releases_against_a_summary_written_before_releases_were_recorded(tmp_path: Path):
    (tmp_path / "results").mkdir()
    old = {"generated": "x", "machine": "y", "verdicts": {vid(REF_VERSION): "pass", vid("5.2.0"): "pass"}}
    (tmp_path / "results" / "summary.json").write_text(json.dumps(old))
    _, _, summary = run_report(tmp_path, [ok(REF_VERSION), ok("5.2.0"), ok("5.3.0")])
    assert summary["new_releases"] == ["5.3.0"]


def test_newly_broken_cells_are_listed_before_the_tables(tmp_path: Path):
    run_report(tmp_path, [ok(REF_VERSION), ok("5.2.0")])
    write_records(tmp_path / "records", [ok("5.2.0", sha="d" * 64)])
    _, md, _ = run_report(tmp_path)
    assert "### Newly broken" in md and vid("5.2.0") in md
    assert md.index("### Newly broken") < md.index("## Detail")


def test_pictures_are_written_with_matplotlib(tmp_path: Path):
    pytest.importorskip("matplotlib")  # the [plot] extra; the test below covers its absence
    _, md, _ = run_report(tmp_path / "with", [ok(REF_VERSION), ok("5.2.0")])
    for name in ("matrix_grid.png", "paris_logit.png"):
        assert (tmp_path / "with" / "results" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(matrix_grid.png)" in md


def test_without_matplotlib_only_the_pictures_are_skipped(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(report_plot, "_pyplot", lambda: None)
    bad, md, summary = run_report(tmp_path, [ok(REF_VERSION), ok("5.2.0")])
    assert bad == 0 and "matplotlib is not installed" in md and summary["counts"] == {"pass": 2}
    assert not list((tmp_path / "results").glob("*.png"))


# --- bad results paths: one line, exit 2 ------------------------------------------------------------------------


def test_results_path_that_is_a_file_or_under_a_file_is_refused(tmp_path: Path):
    write_records(tmp_path / "records", [ok(REF_VERSION)])
    (tmp_path / "file").write_text("")
    for results in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(DestinationError):
            report.write_report(tmp_path / "records", results, log=lambda *a: None)


def test_read_only_results_dir_is_refused_before_anything_is_written(tmp_path: Path, monkeypatch):
    """chmod does not stop root (these tests may run as root), so the write check itself is faked."""
    write_records(tmp_path / "records", [ok(REF_VERSION)])
    monkeypatch.setattr(pair.os, "access", lambda *a: False)
    with pytest.raises(DestinationError, match="not writable"):
        report.write_report(tmp_path / "records", tmp_path / "results", log=lambda *a: None)
    assert not list((tmp_path / "results").iterdir())


@pytest.mark.parametrize("content", ["{", "[]", '{"verdicts": {"a": 1}}'])
def test_corrupt_committed_summary_is_an_error_not_overwritten(tmp_path: Path, content: str):
    write_records(tmp_path / "records", [ok(REF_VERSION)])
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "summary.json").write_text(content)
    with pytest.raises(OpensciPatchError, match="summary.json"):
        report.write_report(tmp_path / "records", tmp_path / "results", log=lambda *a: None)
    assert (tmp_path / "results" / "summary.json").read_text() == content


def test_cli_report_bad_paths_are_one_line_and_exit_2(tmp_path: Path):
    write_records(tmp_path / "records", [ok(REF_VERSION)])
    (tmp_path / "file").write_text("")
    for results in (tmp_path / "file",):
        proc = subprocess.run(
            [sys.executable, "-m", "opensci_patch.cli", "report", "--records", str(tmp_path / "records"),
             "--results", str(results)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_cli_report_exits_1_on_a_problem(tmp_path: Path):
    write_records(tmp_path / "records", [ok(REF_VERSION)])
    (tmp_path / "records" / "broken.json").write_text("{")
    proc = subprocess.run(
        [sys.executable, "-m", "opensci_patch.cli", "report", "--records", str(tmp_path / "records"),
         "--results", str(tmp_path / "results")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr


# --- issue 19: variants with their own reference, a model whose own decode is broken ------------------------


def test_a_variant_with_weights_of_its_own_is_compared_with_its_own_reference_release_cell():
    own = "llama-research"
    assert VARIANTS[own].reference == own
    recs = [ok(REF_VERSION), ok(REF_VERSION, own, sha="b" * 64), ok("5.3.0", own, sha="b" * 64), ok("5.2.0", own)]
    got = verdicts(recs)
    assert got[vid(REF_VERSION, own)] == ("pass", "")
    assert got[vid("5.3.0", own)] == ("pass", "")
    assert got[vid("5.2.0", own)] == ("FAIL", "logits differ from the reference cell")


def test_a_decode_broken_on_the_reference_release_too_is_one_line_naming_the_first_bad_step():
    recs = [mismatch(REF_VERSION), mismatch("5.2.0"), mismatch("5.24.0"), ok(REF_VERSION, "llama-research")]
    rep = report.build(report.Loaded(records=recs, sources=[f"{r.cell_id}.json" for r in recs]), None)
    lines = [p for p in rep.problem_lines() if "own decode" in p]
    assert lines == [
        f"{REF_MODEL} (cpu, cpu, float32, eager): the model's own decode is broken on every release, including the "
        f"oldest release (transformers {REF_VERSION}): step 1: cached logits differ by 3.2 from the no-cache "
        "recomputation"
    ]
    fewer = [mismatch(REF_VERSION), ok("5.2.0")]
    rep = report.build(report.Loaded(records=fewer, sources=[f"{r.cell_id}.json" for r in fewer]), None)
    assert any("broken on 1 of 2 releases, including the oldest release" in p for p in rep.problem_lines())
    rep = report.build(report.Loaded(records=fewer, sources=["a", "b"]), None, reference_release=REF_VERSION)
    assert any("broken on 1 of 2 releases, including the reference" in p for p in rep.problem_lines())
    ok_ref = [ok(REF_VERSION), mismatch("5.2.0")]
    assert not report.build(report.Loaded(records=ok_ref, sources=["a", "b"]), None).problem_lines()


# --- no reference cell; a record of another release than its cell ---------------------------------------------------


def test_no_reference_cell_is_cannot_judge_not_fail_and_still_exits_non_zero(tmp_path: Path):
    import test_report as tr

    bad, md, summary = tr.run_report(tmp_path, [tr.ok("5.2.0")])
    assert summary["verdicts"][tr.vid("5.2.0")] == "cannot-judge" and bad == 1
    assert "FAIL" not in summary["counts"]


def test_a_record_whose_environment_disagrees_with_its_cell_is_an_error_not_the_cell(tmp_path: Path):
    import test_report as tr

    other = tr.ok("5.2.0")
    other.environment["transformers"] = "4.57.6"
    bad, md, summary = tr.run_report(tmp_path, [tr.ok(tr.REF_VERSION), other])
    assert summary["verdicts"][tr.vid("5.2.0")] == "error" and bad == 1
    assert any("ran transformers '4.57.6'" in p for p in summary["problems"])

