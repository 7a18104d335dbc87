"""Issue 25: any checkpoint judged on its own terms, and many checkpoints in one matrix.

Small record sets built here by hand, each declaring what `matrix.expectation` declares for its cell when it runs
(the record carries it, as the runner writes it); the verdicts asserted are the ones the issue asks for.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from opensci_patch._util import fs
from opensci_patch._util.errors import OpensciPatchError
from opensci_patch.matrix import runner
from opensci_patch.matrix.spec import SHIPPED, Cell, expectation
from opensci_patch.measure import records
from opensci_patch.measure.records import (
    CellInfo,
    Expected,
    Fp64Reference,
    Generation,
    KVCheck,
    Record,
    Target,
    TopToken,
)
from opensci_patch.results import judge, report

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DIR = REPO / "opensci_patch" / "data" / "opensci-tiny"
STEPS = ("s0" * 32, "s1" * 32, "s2" * 32)
RELEASES = ("4.48.0", "4.57.6", "5.0.0", "5.25.0")
ALL = ("original", "structural", "patched", "patched+init")


def cell(version: str, model: str, checkpoint: str = SHIPPED, attn: str = "eager") -> Cell:
    return Cell(version, "cpu", model, "float32", attn, checkpoint)


def ran(c: Cell, sha: str = "a" * 64, gap: float | None = None) -> Record:
    """A cell that ran to the end, its first logits hashing to `sha`; `gap`: its fp64 reference's gap."""
    return Record(
        settings={"dtype": c.dtype, "attn": c.attn, "device": "cpu"},
        environment={"transformers": c.transformers, "torch": "2.13.0+cpu"},
        model={"patched": c.model != "original"},
        target=Target(" Paris", 5, 14.5, 1),
        topk=(TopToken(5, " Paris", 14.5),),
        logits_sha256=sha,
        generation=Generation((5, 6), " Paris.", STEPS, KVCheck(True, 1e-4, 0.0, None, "")),
        reference=None if gap is None else Fp64Reference("float64", gap, 14.5),
        cell=CellInfo.of(c),
        expected=Expected.of(expectation(c)),
    )


def broke(c: Cell, exc_type: str, message: str, status: str = "load-error") -> Record:
    rec = records.error_record(c, status, exc_type, message, "tb", expected=expectation(c))
    return rec


def got(recs: list[Record], **kw) -> dict[str, tuple[str, str]]:
    return {r.cell: (r.status, r.why) for r in judge.rows(recs, **kw)}


def built(recs: list[Record], **kw) -> judge.Report:
    return report.build(report.Loaded(records=recs, sources=[f"{r.cell_id}.json" for r in recs]), None, **kw)


def write_and_report(tmp_path: Path, recs: list[Record], **kw) -> tuple[int, str, dict]:
    (tmp_path / "records").mkdir(exist_ok=True)
    for rec in recs:
        fs.write_atomic(tmp_path / "records" / f"{rec.cell_id}.json", rec)
    bad = report.write_report(tmp_path / "records", tmp_path / "results", log=lambda *a: None, **kw)
    res = tmp_path / "results"
    return bad, (res / "matrix.md").read_text(), json.loads((res / "summary.json").read_text())


# --- signatures: a rule explains only the failure it describes ---------------------------------------------------


def test_another_models_original_failing_otherwise_shows_its_own_error_and_no_borrowed_explanation():
    """5.0.0 `original` of a user's model fails with KeyError: 'default': not "ImportError of LossKwargs"."""
    mine = [ran(cell(v, "patched", "mine")) for v in RELEASES]
    other = broke(cell("5.0.0", "original", "mine"), "KeyError", "'default'")
    status, why = got([*mine, other])[other.cell_id]
    assert why.startswith("load-error: KeyError: 'default'") and "LossKwargs" not in why
    assert status == "expected-fail"  # unpatched code promises nothing on a user's checkpoint
    # the same failure on our checkpoint, where the rule is declared: not the declared failure, so FAIL
    ours = broke(cell("5.0.0", "original"), "KeyError", "'default'")
    status, why = got([ran(cell("4.48.0", "patched")), ours])[ours.cell_id]
    assert status == "FAIL" and why.startswith("load-error: KeyError: 'default'") and "not the declared" in why
    # the declared one: explained, the record's own line first
    real = broke(cell("5.0.0", "original"), "ImportError", "cannot import name 'LossKwargs' from 'transformers.utils'")
    status, why = got([ran(cell("4.48.0", "patched")), real])[real.cell_id]
    assert status == "expected-fail"
    assert why.startswith("load-error: ImportError: cannot import name 'LossKwargs'") and "removed in 4.54" in why


def test_the_wrong_logits_symptom_is_measured_not_assumed():
    """5.0 `patched` is declared to lose its weights: far from fp64 it is expected-fail, a rounding-level
    difference (within the fp64 tolerance) is not that failure."""
    ref = ran(cell("4.48.0", "patched"), gap=3e-6)
    wiped = ran(cell("5.0.0", "patched"), sha="b" * 64, gap=14.6)
    rounded = ran(cell("5.1.0", "patched"), sha="c" * 64, gap=4e-6)
    verdicts = got([ref, wiped, rounded])
    assert verdicts[wiped.cell_id][0] == "expected-fail"
    assert verdicts[wiped.cell_id][1].startswith("logits differ from the reference cell (upstream 5.0/5.1")
    assert verdicts[rounded.cell_id][0] == "FAIL" and "not the declared failure" in verdicts[rounded.cell_id][1]


# --- a user's checkpoint: a pass is a pass -----------------------------------------------------------------------


def test_a_user_model_that_works_everywhere_passes_and_the_report_exits_0(tmp_path: Path):
    recs = [ran(cell(v, m, "mine")) for v in RELEASES for m in ALL]
    bad, md, summary = write_and_report(tmp_path, recs)
    assert bad == 0 and set(summary["verdicts"].values()) == {"pass"}
    assert "XPASS" not in md
    # the same records declared for our checkpoint are XPASS: the rules name it
    ours = [ran(cell(v, m)) for v in RELEASES for m in ALL]
    assert {s for s, _ in got(ours).values()} == {"pass", "XPASS"}


def test_a_user_models_patched_failure_is_still_a_fail(tmp_path: Path):
    recs = [ran(cell(v, "patched", "mine")) for v in RELEASES[:3]]
    recs.append(broke(cell("5.25.0", "patched", "mine"), "AttributeError", "no attribute 'pad_token_id'"))
    bad, _, summary = write_and_report(tmp_path, recs)
    assert bad == 1 and summary["verdicts"][recs[-1].cell_id] == "FAIL"


# --- the reference release ---------------------------------------------------------------------------------------


def test_a_model_that_does_not_run_on_4_48_is_compared_with_the_oldest_release_that_runs_it(tmp_path: Path):
    no_qwen3 = broke(cell("4.48.0", "patched", "qwen"), "MissingLibraryModule", "transformers.models.qwen3 missing")
    recs = [no_qwen3, *(ran(cell(v, "patched", "qwen"), sha="q" * 64) for v in RELEASES[1:])]
    recs.append(ran(cell("5.25.0", "patched+init", "qwen"), sha="z" * 64))
    bad, md, summary = write_and_report(tmp_path, recs)
    verdicts = summary["verdicts"]
    assert [verdicts[cell(v, "patched", "qwen").id] for v in RELEASES[1:]] == ["pass"] * 3
    assert verdicts[cell("5.25.0", "patched+init", "qwen").id] == "FAIL"  # compared with 4.57.6, not passed
    assert verdicts[no_qwen3.cell_id] == "expected-fail"
    row = next(r for r in summary["rows"] if r["cell"] == no_qwen3.cell_id)
    assert row["why"].startswith("load-error: MissingLibraryModule") and "older than transformers 4.57.6" in row["why"]
    line = "qwen, patched (cpu, cpu, float32, eager): transformers 4.57.6, the oldest release where patched runs"
    assert any(ref.startswith(line) and "not on 4.48.0" in ref for ref in summary["references"])
    assert line in md and bad == 1


def test_reference_release_option_overrides_the_oldest_and_is_said(tmp_path: Path):
    recs = [ran(cell(v, "patched", "mine"), sha=("o" if v == "4.48.0" else "n") * 64) for v in RELEASES]
    default = got(recs)
    assert default[cell("5.25.0", "patched", "mine").id][0] == "FAIL"
    chosen = got(recs, release="4.57.6")
    assert chosen[cell("5.25.0", "patched", "mine").id] == ("pass", "")
    assert chosen[cell("4.48.0", "patched", "mine").id][0] == "FAIL"
    bad, md, _ = write_and_report(tmp_path, recs, reference_release="4.57.6")
    assert "transformers 4.57.6, as --reference-release says" in md and bad == 1
    with pytest.raises(OpensciPatchError, match="no cell record of that release"):
        write_and_report(tmp_path, recs, reference_release="5.3.0")


# --- a failure identical everywhere: one line ---------------------------------------------------------------------


def test_the_same_failure_on_every_release_is_one_problem_line_that_says_try_sdpa():
    recs = [broke(cell(v, m, "llama32"), "KeyError", "'eager'") for v in RELEASES for m in ("patched", "patched+init")]
    rep = built(recs)
    same = [p for p in rep.problem_lines() if "fails the same way" in p]
    assert same == [
        "llama32, patched, patched+init (cpu torch, cpu, float32, eager): fails the same way on every release: "
        "load-error: KeyError: 'eager'; try --attn sdpa"
    ]
    assert all(r.status == "FAIL" and r.why.startswith("load-error: KeyError: 'eager'") for r in rep.table)
    assert rep.bad > 0


def test_an_import_error_naming_each_releases_own_file_is_still_the_same_failure():
    def missing(v: str) -> Record:
        where = f"/envs/tf{v}-cpu-py3.11/lib/python3.11/site-packages/transformers/utils/__init__.py"
        message = f"cannot import name 'Gone' from 'transformers.utils' ({where})"
        return broke(cell(v, "patched", "old"), "ImportError", message)

    same = [p for p in built([missing(v) for v in RELEASES]).problem_lines() if "fails the same way" in p]
    assert same == [
        "old, patched (cpu torch, cpu, float32, eager): fails the same way on every release: "
        "load-error: ImportError: cannot import name 'Gone' from 'transformers.utils'; try --attn sdpa"
    ]


def test_with_sdpa_cells_that_run_the_eager_failure_is_a_note_and_sdpa_is_judged(tmp_path: Path):
    eager = [broke(cell(v, "patched", "llama32"), "KeyError", "'eager'") for v in RELEASES]
    sdpa = [ran(cell(v, "patched", "llama32", attn="sdpa")) for v in RELEASES]
    bad, md, summary = write_and_report(tmp_path, [*eager, *sdpa])
    assert bad == 0 and not summary["problems"]
    assert summary["notes"] == [
        "llama32, patched (cpu torch, cpu, float32, eager): fails the same way on every release under eager: "
        "load-error: KeyError: 'eager'; runs under sdpa, judged there"
    ]
    assert {summary["verdicts"][r.cell_id] for r in sdpa} == {"pass"}
    assert {summary["verdicts"][r.cell_id] for r in eager} == {"expected-fail"}
    assert "## Notes" in md


def test_a_forward_error_under_eager_with_sdpa_cells_that_run_is_judged_under_sdpa(tmp_path: Path):
    """A file without the eager branch loads, then fails at its first forward: KeyError 'eager' at forward time."""
    eager = [broke(cell(v, "patched", "eagerless", attn="eager"), "KeyError", "'eager'", "forward-error")
             for v in RELEASES]  # fmt: skip
    sdpa = [ran(cell(v, "patched", "eagerless", attn="sdpa")) for v in RELEASES]
    bad, _, summary = write_and_report(tmp_path, [*eager, *sdpa])
    assert bad == 0 and not summary["problems"]
    assert summary["notes"] == [
        "eagerless, patched (cpu torch, cpu, float32, eager): fails the same way on every release under eager: "
        "forward-error: KeyError: 'eager'; runs under sdpa, judged there"
    ]


def test_a_file_that_refuses_sdpa_everywhere_is_judged_under_eager(tmp_path: Path):
    message = "ResearchForCausalLM does not support an attention implementation through torch.nn.functional.sdpa"
    sdpa = [broke(cell(v, "patched", "nosdpa", attn="sdpa"), "ValueError", message) for v in RELEASES]
    eager = [ran(cell(v, "patched", "nosdpa")) for v in RELEASES]
    bad, _, summary = write_and_report(tmp_path, [*eager, *sdpa])
    assert bad == 0 and not summary["problems"]
    assert summary["notes"] == [
        "nosdpa, patched (cpu torch, cpu, float32, sdpa): fails the same way on every release under sdpa: "
        f"load-error: ValueError: {message}; runs under eager, judged there"
    ]
    assert {summary["verdicts"][r.cell_id] for r in sdpa} == {"expected-fail"}
    # without the eager cells the same failure is a problem that names the attention to try
    only = [p for p in built(sdpa).problem_lines() if "fails the same way" in p]
    assert len(only) == 1 and only[0].endswith("; try --attn eager")


# --- many checkpoints in one matrix -------------------------------------------------------------------------------


def test_two_checkpoints_in_one_report_have_their_own_columns_and_references(tmp_path: Path):
    a = [ran(cell(v, m, "alpha"), sha="a" * 64) for v in RELEASES for m in ("original", "patched")]
    b = [broke(cell("4.48.0", "patched", "beta"), "MissingLibraryModule", "qwen3")]
    b += [ran(cell(v, "patched", "beta"), sha="b" * 64) for v in RELEASES[1:]]
    b.append(ran(cell("5.25.0", "patched+init", "beta"), sha="a" * 64))  # alpha's logits: FAIL against beta's
    bad, md, summary = write_and_report(tmp_path, [*a, *b])
    (grid,) = summary["grid"].values()
    assert list(grid["5.25.0"]) == ["alpha/original", "alpha/patched", "beta/patched", "beta/patched+init"]
    assert grid["5.25.0"]["alpha/patched"] == grid["5.25.0"]["beta/patched"] == "pass"
    assert grid["5.25.0"]["beta/patched+init"] == "FAIL" and grid["5.25.0"]["alpha/original"] == "pass"
    assert grid["4.48.0"]["beta/patched+init"] == "missing" and grid["4.48.0"]["beta/patched"] == "expected-fail"
    refs = summary["references"]
    assert any(r.startswith("alpha, patched (cpu, cpu, float32, eager): transformers 4.48.0") for r in refs)
    assert any(r.startswith("beta, patched (cpu, cpu, float32, eager): transformers 4.57.6") for r in refs)
    assert "| beta/patched " in md and bad == 1


def test_cell_ids_carry_the_checkpoint_and_parse_back():
    c = cell("5.0.0", "patched+init", "my-model")
    assert c.id == "tf5.0.0-cpu-patched+init-float32-eager@my-model"
    assert Cell.parse(c.id) == c and Cell.parse(cell("5.0.0", "patched").id) == cell("5.0.0", "patched")


def test_records_from_before_checkpoints_and_signatures_still_load_as_ours(tmp_path: Path):
    rec = ran(cell("5.0.0", "original"))
    data = json.loads(rec.to_json())
    del data["cell"]["checkpoint"]
    data["expected"] = {"outcome": "xfail", "reason": "old rule"}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    old = records.load(path)
    assert old.cell.checkpoint == SHIPPED and old.cell_id == cell("5.0.0", "original").id
    assert old.expected == Expected("xfail", "old rule", None, None, True, True)
    failed = broke(cell("5.0.0", "original"), "KeyError", "'x'")
    failed.expected = old.expected  # an old rule without a signature explains any failure, as it did
    assert got([ran(cell("4.48.0", "patched")), failed])[failed.cell_id][0] == "expected-fail"


def test_cell_model_is_repeatable_and_two_dirs_of_one_name_are_refused(monkeypatch, tmp_path: Path, capsys):
    from opensci_patch import cli

    for where in ("a/same", "b/same", "c/other"):
        shutil.copytree(FIXTURE_DIR, tmp_path / where)
    seen = []
    monkeypatch.setattr(runner, "main_cells", lambda cells, dirs, *a, **k: seen.append((cells, dirs)) or 0)
    base = ["cell", "--transformers", "4.48.0", "--transformers", "5.25.0", "--records", str(tmp_path / "r")]
    assert cli.main([*base, "--model", str(tmp_path / "a/same"), "--model", str(tmp_path / "c/other")]) == 0
    ((cells, dirs),) = seen
    assert dirs == {"same": tmp_path / "a/same", "other": tmp_path / "c/other"}
    assert {(c.checkpoint, c.transformers, c.model) for c in cells} == {
        (k, v, m) for k in ("same", "other") for v in ("4.48.0", "5.25.0") for m in ALL
    }
    assert cli.main([*base, "--model", str(tmp_path / "a/same"), "--model", str(tmp_path / "b/same")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "have one name ('same')" in err[0]


def test_the_runner_gives_each_checkpoints_cells_their_own_model_dir(monkeypatch, tmp_path: Path):
    given = {}

    def fake_release(run, cells):
        for c in cells:
            given[c.id] = run.models[(c.checkpoint, c.model)]
            run.write(c, records.error_record(c, "crash", "Fake", "fake runner", ""), 0.1)

    monkeypatch.setattr(runner, "run_release", fake_release)
    dirs = {"one": tmp_path / "one", "two": tmp_path / "two"}
    cells = [cell("5.0.0", "original", k) for k in dirs]
    runner.run_cells(cells, dirs, tmp_path / "records", log=lambda m: None)
    assert given == {cells[0].id: dirs["one"], cells[1].id: dirs["two"]}
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == sorted(f"{c.id}.json" for c in cells)
