"""The sweep runner: hotfix once per variant per run, one capture process per release, crash fallback, --jobs.

The real runs use the installed transformers (the interpreter running the tests stands in for every
release's env), so they need no env build; the --jobs test uses a fake release runner.
"""

from __future__ import annotations

import json
import sys
import threading
from importlib import metadata
from pathlib import Path

import pytest

from opensci_patch import batch, runner
from opensci_patch import records as rec_io
from opensci_patch.envs import Env
from opensci_patch.matrix import Cell, expectation

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DIR = REPO / "opensci_patch" / "data" / "opensci-tiny"
INSTALLED = metadata.version("transformers")
VARIANTS = ["original", "patched", "patched+init"]  # no `generated`: it needs the 4.54.0 wheel


@pytest.fixture
def this_python_env(monkeypatch, tmp_path: Path) -> list[list[str]]:
    """Every release's env is this interpreter; returns the steps of every batch process started (argv lists)."""
    calls: list[str] = []
    monkeypatch.setenv("OPENSCI_PATCH_ENV_ROOT", str(tmp_path / "env-root"))  # the hotfix cache lives there
    monkeypatch.setattr(
        "opensci_patch.envs.ensure_env",
        lambda version, build, **kw: (
            calls.append(version) or Env(tmp_path / "env", Path(sys.executable), version, build, reused=True)
        ),
    )
    batches: list[list[str]] = []
    real = runner.run_batch

    def counting(env, steps, plan_dir, **kw):
        batches.append([s.argv for s in steps])
        return real(env, steps, plan_dir, **kw)

    monkeypatch.setattr(runner, "run_batch", counting)
    return batches


def _load_all(records: Path, cells: list[Cell]) -> dict[str, rec_io.Record]:
    return {c.id: rec_io.load(records / f"{c.id}.json") for c in cells}


def _evidence(rec: rec_io.Record) -> tuple:
    """What must be identical between a shared-process and a one-process-per-cell capture."""
    gen = rec.generation
    return rec.status, rec.logits_sha256, gen and gen.step_logits_sha256, gen and gen.ids


@pytest.mark.crossversion  # runs cells: 18 captures
def test_hotfix_once_per_variant_and_batch_records_equal_one_process_per_cell(
    this_python_env, tmp_path: Path, monkeypatch
):
    batches = this_python_env
    # run 1: two releases (both this interpreter), all cells of a release in one shared capture process
    cells = [Cell(v, "cpu", m) for v in (INSTALLED, "4.99.0") for m in VARIANTS]
    lines: list[str] = []
    assert runner.run_cells(cells, FIXTURE_DIR, tmp_path / "batch", log=lines.append) == len(cells)
    hotfixes = [argv for batch in batches for argv in batch if argv[0] == "hotfix"]
    assert len(hotfixes) == 2  # patched and patched+init once each, for two releases
    outs = [Path(argv[argv.index("--out") + 1]).name for argv in hotfixes]
    assert len(set(outs)) == 2 and FIXTURE_DIR.name not in outs  # own basenames: own remote-code module names
    captures = [batch for batch in batches if batch[0][0] == "capture"]
    assert [len(b) for b in captures] == [3, 3]  # one process per release, every variant in it
    batch = _load_all(tmp_path / "batch", cells)
    assert all(r.status != rec_io.RUNNING and r.cell_id == c for c, r in batch.items())
    assert sum(line.startswith(f"[{i}/{len(cells)}] ") for i in range(1, 7) for line in lines) == len(cells)

    # a second run of the same code on the same checkpoint reuses the hotfix outputs: no hotfix step at all
    batches.clear()
    runner.run_cells(cells[:3], FIXTURE_DIR, tmp_path / "again", log=lines.append)
    assert not [argv for b in batches for argv in b if argv[0] == "hotfix"]
    again = _load_all(tmp_path / "again", cells[:3])
    assert all(_evidence(again[c.id]) == _evidence(batch[c.id]) for c in cells[:3])

    # run 2: the shared process dies (SIGKILL) after its first capture: the other cells rerun one process each
    batches.clear()
    monkeypatch.setenv(runner.CRASH_AFTER_VAR, "1")
    one = [c for c in cells if c.transformers == INSTALLED]
    lines.clear()
    runner.run_cells(one, FIXTURE_DIR, tmp_path / "crash", log=lines.append)
    assert [line for line in lines if "the shared process" in line] == [
        f"    the shared process ({INSTALLED}) exit -9: 2 step(s) rerun one per process"
    ]  # what the run says: the two cells the crash cost were run again
    crashed = _load_all(tmp_path / "crash", one)
    for cell in one:
        got, want = crashed[cell.id], batch[cell.id]
        assert got.status == want.status != rec_io.RUNNING, cell.id
        if expectation(cell).outcome == "pass":  # expected failures may be garbage by nature (no bits to compare)
            assert got.status == "ok"
            assert _evidence(got) == _evidence(want), cell.id
    assert crashed[one[0].id].status == "load-error"  # the original code, captured before the crash


def test_a_capture_with_bad_input_is_a_run_error_not_a_model_failure(tmp_path: Path):
    """In the batch, exit 2 of one step (here: no such model dir) is recorded as such; the next step still runs."""
    cell = Cell(INSTALLED, "cpu", "patched")
    steps = []
    for i, model in enumerate((tmp_path / "missing", tmp_path / "missing-too")):
        work = tmp_path / f"w{i}"
        work.mkdir()
        final = tmp_path / f"final{i}.json"
        argv = ["capture", str(model), "--out", str(work / "record.json"), "--quiet"]
        steps.append(
            batch.Step(
                argv, work / "status.json", cell, work / "record.json", final, {"outcome": "pass", "reason": ""}
            ).to_json()
        )
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"steps": steps}))
    assert batch.run_plan(plan) == 0
    for i in range(2):
        rec = rec_io.load(tmp_path / f"final{i}.json")
        assert rec.status == "crash" and rec.status not in rec_io.MODEL_FAILURES
        assert rec.error.type == "exit 2" and "no such directory" in rec.error.message
        assert json.loads((tmp_path / f"w{i}" / "status.json").read_text())["rc"] == 2


def test_capture_batch_refuses_a_bad_plan_with_one_line(tmp_path: Path, capsys):
    from opensci_patch.cli import main

    bad = tmp_path / "plan.json"
    bad.write_text("[1, 2")
    assert main(["capture-batch", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not a capture-batch plan" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("jobs", [1, 2])
def test_jobs_runs_releases_in_parallel_with_one_line_per_cell(monkeypatch, tmp_path: Path, jobs: int):
    running, peak, lock = [0], [0], threading.Lock()
    both_running = threading.Barrier(2, timeout=30)

    def fake_release(run, cells):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        if jobs > 1:
            both_running.wait()  # raises BrokenBarrierError unless two releases are in flight at once
        for cell in cells:
            rec = rec_io.error_record(cell, "crash", "Fake", "fake runner", "")
            run.write(cell, rec, 0.5)
        with lock:
            running[0] -= 1

    monkeypatch.setattr(runner, "hotfix_variants", lambda *a, **k: None)
    monkeypatch.setattr(runner, "run_release", fake_release)
    cells = [Cell(v, "cpu", m) for v in ("4.48.0", "5.2.0", "5.23.0", "5.24.0") for m in ("original", "patched")]
    lines: list[str] = []
    runner.run_cells(cells, FIXTURE_DIR, tmp_path, jobs=jobs, log=lines.append)
    assert peak[0] == jobs
    progress = lines[:-1]
    assert len(progress) == len(cells)
    assert sorted(line.split()[1].rstrip(":") for line in progress) == sorted(c.id for c in cells)
    assert [line.split()[0] for line in progress] == [f"[{i}/{len(cells)}]" for i in range(1, len(cells) + 1)]
    assert all("(expected " in line and ", 0.5s)" in line for line in progress)
    assert lines[-1].startswith(f"{len(cells)} cells in ")
    assert all(rec_io.load(tmp_path / f"{c.id}.json").status == "crash" for c in cells)


def test_cell_jobs_option(monkeypatch, tmp_path: Path, capsys):
    import os

    from opensci_patch import cli

    got = []
    monkeypatch.setattr(runner, "main_cells", lambda cells, *a, jobs=1, **k: got.append(jobs) or 0)
    base = ["cell", "--transformers", "5.2.0", "--records", str(tmp_path)]
    assert cli.main(base) == 0 and cli.main([*base, "--jobs", "3"]) == 0 and cli.main([*base, "--jobs", "auto"]) == 0
    assert got == [1, 3, os.cpu_count()]
    with pytest.raises(SystemExit) as exc:
        cli.main([*base, "--jobs", "0"])
    assert exc.value.code == 2 and "N >= 1 or auto" in capsys.readouterr().err
