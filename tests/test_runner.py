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

from opensci_patch.matrix import runner, worker
from opensci_patch.matrix.envs import Env
from opensci_patch.matrix.spec import Cell, expectation
from opensci_patch.measure import records as rec_io

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DIR = REPO / "opensci_patch" / "data" / "opensci-tiny"
INSTALLED = metadata.version("transformers")
VARIANTS = ["original", "patched", "patched+init"]  # no `generated`: it needs the 4.54.0 wheel


@pytest.fixture
def this_python_env(monkeypatch, tmp_path: Path) -> list[list[worker.Step]]:
    """Every release's env is this interpreter; returns the steps of every worker started."""
    calls: list[str] = []
    monkeypatch.setenv("OPENSCI_PATCH_ENV_ROOT", str(tmp_path / "env-root"))  # the hotfix cache lives there
    monkeypatch.setattr(
        "opensci_patch.matrix.envs.ensure_env",
        lambda version, build, **kw: (
            calls.append(version) or Env(tmp_path / "env", Path(sys.executable), version, build, reused=True)
        ),
    )
    batches: list[list[worker.Step]] = []
    real = runner.run_worker

    def counting(env, steps, tmp, **kw):
        batches.append(list(steps))
        return real(env, steps, tmp, **kw)

    monkeypatch.setattr(runner, "run_worker", counting)
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
    hotfixes = [s for batch in batches for s in batch if isinstance(s, worker.HotfixStep)]
    assert len(hotfixes) == 2  # patched and patched+init once each, for two releases
    outs = [s.out.name for s in hotfixes]
    assert len(set(outs)) == 2 and FIXTURE_DIR.name not in outs  # own basenames: own remote-code module names
    captures = [batch for batch in batches if isinstance(batch[0], worker.CaptureStep)]
    assert [len(b) for b in captures] == [3, 3]  # one process per release, every variant in it
    batch = _load_all(tmp_path / "batch", cells)
    assert all(r.status != rec_io.RUNNING and r.cell_id == c for c, r in batch.items())
    assert sum(line.startswith(f"[{i}/{len(cells)}] ") for i in range(1, 7) for line in lines) == len(cells)

    # a second run of the same code on the same checkpoint reuses the hotfix outputs: no hotfix step at all
    batches.clear()
    runner.run_cells(cells[:3], FIXTURE_DIR, tmp_path / "again", log=lines.append)
    assert not [s for b in batches for s in b if isinstance(s, worker.HotfixStep)]
    again = _load_all(tmp_path / "again", cells[:3])
    assert all(_evidence(again[c.id]) == _evidence(batch[c.id]) for c in cells[:3])

    # run 2: the shared process dies (SIGKILL) after its first capture: the other cells rerun one process each
    batches.clear()
    monkeypatch.setenv(worker.CRASH_AFTER_VAR, "1")
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
    """In the worker, exit 2 of one step (here: no such model dir) is recorded as such; the next step still runs."""
    cell = Cell(INSTALLED, "cpu", "patched")
    steps = [
        worker.CaptureStep(tmp_path / model, cell, tmp_path / f"final{i}.json", expectation(cell))
        for i, model in enumerate(("missing", "missing-too"))
    ]
    results: list[worker.StepResult] = []
    assert worker.run_steps(steps, results.append) == 0
    assert [(r.index, r.rc) for r in results] == [(0, 2), (1, 2)]
    for i in range(2):
        rec = rec_io.load(tmp_path / f"final{i}.json")
        assert rec.status == "crash" and rec.status.no_evidence  # a run error, not a model failure
        assert rec.error.type == "exit 2" and "no such directory" in rec.error.message
        assert rec.cell_id == cell.id and rec.expected == rec_io.Expected("pass", "")


def test_the_worker_streams_one_result_line_per_step_and_refuses_bad_steps_with_one_line(tmp_path: Path):
    """The process protocol: steps as JSON on stdin, one JSON result line per step on stdout, nothing else there."""
    import subprocess

    src = tmp_path / "src"
    src.mkdir()
    steps = [
        worker.HotfixStep.for_variant("structural", src, tmp_path / "fixed"),  # not a model dir: exit 2
        worker.HotfixStep.for_variant("patched", FIXTURE_DIR, tmp_path / "patched"),
    ]
    payload = json.dumps([worker.step_to_json(s) for s in steps])
    cmd = [sys.executable, "-m", "opensci_patch.matrix.worker"]
    proc = subprocess.run(cmd, input=payload, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["index"], r["rc"]) for r in lines] == [(0, 2), (1, 0)]
    assert "opensci-patch: error:" in lines[0]["stderr"] and (tmp_path / "patched" / "modeling_opensci.py").is_file()

    bad = subprocess.run(cmd, input="[1, 2", capture_output=True, text=True, timeout=300, cwd=REPO)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "not a list of steps" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_steps_round_trip_through_json_and_variants_map_to_hotfix_options(tmp_path: Path):
    cell = Cell("5.2.0", "cpu", "structural", "bfloat16", "sdpa")
    steps = [
        worker.HotfixStep.for_variant("structural", tmp_path, tmp_path / "out"),
        worker.HotfixStep.for_variant("patched+init", tmp_path, tmp_path / "out"),
        worker.CaptureStep(tmp_path / "m", cell, tmp_path / "r.json", expectation(cell)),
        worker.CaptureStep(tmp_path / "m", cell, tmp_path / "r.json", expectation(cell), reference="off"),
    ]
    assert steps[3].reference == "off" and worker.step_to_json(steps[3])["reference"] == "off"
    assert steps[0].only == ("loss_kwargs", "rope_default", "tied_weights") and steps[0].extras == ()
    assert steps[1].only is None and steps[1].extras == ("init_weights",)
    assert [worker.step_from_json(json.loads(json.dumps(worker.step_to_json(s)))) for s in steps] == steps


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


# --- the cell command's exit status ---------------------------------------------------------------------------------


def test_cell_exits_non_zero_when_its_cells_could_not_run(cli, tmp_path: Path):
    """OPENSCI_PATCH_WHEELS naming an empty directory: every cell is an env-error, and the command said exit 0.

    (A name that is no directory is refused up front now: exit 2, tests/test_env_settings.py.)"""
    import subprocess
    import sys

    from opensci_patch._util.procs import child_env

    records, wheels = tmp_path / "records", tmp_path / "no-wheels"
    wheels.mkdir()
    env = child_env({"OPENSCI_PATCH_WHEELS": str(wheels), "OPENSCI_PATCH_ENV_ROOT": str(tmp_path / "e")})
    proc = subprocess.run(
        [sys.executable, "-m", "opensci_patch.cli", "cell", "--transformers", "4.48.0", "--variant", "patched",
         "--records", str(records)],
        text=True, capture_output=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "could not run" in proc.stderr.strip().splitlines()[-1]

