"""The sweep runner: hotfix once per variant per run (in the driver), one capture process per release, crash
fallback, --jobs, one writer per record.

The real runs use the installed transformers (the interpreter running the tests stands in for every
release's env), so they need no env build; the --jobs and one-writer tests use a fake release runner or worker.
"""

from __future__ import annotations

import json
import sys
import threading
from importlib import metadata
from pathlib import Path

import pytest

from opensci_patch._util import child, fs
from opensci_patch._util.errors import EnvironmentSetupError
from opensci_patch.matrix import hotfix_cache, runner, worker
from opensci_patch.matrix.envs import Env
from opensci_patch.matrix.spec import Cell, expectation
from opensci_patch.measure import records as rec_io

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DIR = REPO / "opensci_patch" / "data" / "opensci-tiny"
INSTALLED = metadata.version("transformers")
VARIANTS = ["original", "patched", "patched+init"]  # no `generated`: it needs the 4.54.0 wheel


@pytest.fixture
def hotfixes(monkeypatch) -> list[tuple]:
    """(variant, source, out) of every hotfix run (in the driver's process, `hotfix_cache.run_hotfix`)."""
    calls: list[tuple] = []
    real = hotfix_cache.run_hotfix
    monkeypatch.setattr(hotfix_cache, "run_hotfix", lambda *a: calls.append(a) or real(*a))
    return calls


@pytest.fixture
def this_python_env(monkeypatch, tmp_path: Path) -> list[list[worker.CaptureStep]]:
    """Every release's env is this interpreter; returns the steps of every worker started."""
    calls: list[str] = []
    monkeypatch.setenv("OPENSCI_PATCH_ENV_ROOT", str(tmp_path / "env-root"))  # the hotfix cache lives there
    monkeypatch.setattr(
        "opensci_patch.matrix.envs.ensure_env",
        lambda version, build, **kw: (
            calls.append(version) or Env(tmp_path / "env", Path(sys.executable), version, build, reused=True)
        ),
    )
    batches: list[list[worker.CaptureStep]] = []
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
    this_python_env, hotfixes, tmp_path: Path, monkeypatch
):
    batches = this_python_env
    # run 1: two releases (both this interpreter), all cells of a release in one shared capture process
    cells = [Cell(v, "cpu", m) for v in (INSTALLED, "4.99.0") for m in VARIANTS]
    lines: list[str] = []
    assert len(runner.run_cells(cells, FIXTURE_DIR, tmp_path / "batch", log=lines.append)) == len(cells)
    assert len(hotfixes) == 2  # patched and patched+init once each, for two releases
    outs = [out.name for _, _, out in hotfixes]
    assert len(set(outs)) == 2 and FIXTURE_DIR.name not in outs  # own basenames: own remote-code module names
    assert [len(b) for b in batches] == [3, 3]  # one process per release, every variant in it
    batch = _load_all(tmp_path / "batch", cells)
    assert all(r.status != rec_io.RUNNING and r.cell_id == c for c, r in batch.items())
    assert sum(line.startswith(f"[{i}/{len(cells)}] ") for i in range(1, 7) for line in lines) == len(cells)

    # a second run of the same code on the same checkpoint reuses the hotfix outputs: no hotfix step at all
    hotfixes.clear()
    runner.run_cells(cells[:3], FIXTURE_DIR, tmp_path / "again", log=lines.append)
    assert not hotfixes
    again = _load_all(tmp_path / "again", cells[:3])
    assert all(_evidence(again[c.id]) == _evidence(batch[c.id]) for c in cells[:3])

    # run 2: the shared process dies (SIGKILL) after its first capture: the other cells rerun one process each
    batches.clear()
    monkeypatch.setenv(child.CRASH_AFTER_VAR, "1")
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
    assert child.run_steps(steps, worker.capture_step, results.append) == 0
    assert [(r.index, r.rc) for r in results] == [(0, 2), (1, 2)]
    for i in range(2):
        rec = rec_io.load(tmp_path / f"final{i}.json")
        assert rec.status == "crash" and rec.status.no_evidence  # a run error, not a model failure
        assert rec.error.type == "exit 2" and "no such directory" in rec.error.message
        assert rec.cell_id == cell.id and rec.expected == rec_io.Expected("pass", "")


def test_the_worker_streams_one_result_line_per_step_and_refuses_bad_steps_with_one_line(tmp_path: Path):
    """The process protocol: capture steps as JSON on stdin, one JSON result line per step on stdout (with what the
    record it wrote says), nothing else there."""
    import subprocess

    cells = [Cell(INSTALLED, "cpu", "patched"), Cell(INSTALLED, "cpu", "original")]
    models = [tmp_path / "missing", FIXTURE_DIR]  # no such dir: exit 2; the shipped code: fails to load on 5.x
    steps = [
        worker.CaptureStep(m, c, tmp_path / f"{c.id}.json", expectation(c)) for m, c in zip(models, cells, strict=True)
    ]
    payload = json.dumps([worker.step_to_json(s) for s in steps])
    cmd = [sys.executable, "-m", "opensci_patch.matrix.worker"]
    proc = subprocess.run(cmd, input=payload, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["index"], r["rc"]) for r in lines] == [(0, 2), (1, 1)]
    assert "opensci-patch: error:" in lines[0]["stderr"]
    for line, step in zip(lines, steps, strict=True):
        rec = rec_io.load(step.final)
        err = f"{rec.error.type}: {rec.error.message}"
        assert line["value"] == {"status": str(rec.status), "wall_s": rec.cell_wall_s, "logit": None, "rank": None,
                                "error": err}  # fmt: skip
    assert [line["value"]["status"] for line in lines] == ["crash", "load-error"]

    bad = subprocess.run(cmd, input="[1, 2", capture_output=True, text=True, timeout=300, cwd=REPO)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "not a list of steps" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_steps_round_trip_through_json(tmp_path: Path):
    cell = Cell("5.2.0", "cpu", "structural", "bfloat16", "sdpa")
    steps = [
        worker.CaptureStep(tmp_path / "m", cell, tmp_path / "r.json", expectation(cell)),
        worker.CaptureStep(tmp_path / "m", cell, tmp_path / "r.json", expectation(cell), reference="off"),
    ]
    assert steps[1].reference == "off" and worker.step_to_json(steps[1])["reference"] == "off"
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


def test_a_release_whose_env_cannot_be_built_still_costs_no_hotfix(monkeypatch, tmp_path: Path, hotfixes):
    """The driver hotfixes in its own process: the only release's env failing leaves the hotfix made (and cached),
    its cells env-errors, never "no env to hotfix in"."""

    def no_env(version, build, **kw):
        raise EnvironmentSetupError(f"cannot build {version}")

    monkeypatch.setenv("OPENSCI_PATCH_ENV_ROOT", str(tmp_path / "env-root"))
    monkeypatch.setattr("opensci_patch.matrix.envs.ensure_env", no_env)
    cells = [Cell("5.2.0", "cpu", "patched")]
    finished = runner.run_cells(cells, FIXTURE_DIR, tmp_path / "records", log=lambda m: None)
    assert [variant for variant, _, _ in hotfixes] == ["patched"]
    assert (hotfix_cache.hotfix_cache_dir(tmp_path / "env-root", FIXTURE_DIR, "patched") / "config.json").is_file()
    rec = rec_io.load(tmp_path / "records" / f"{cells[0].id}.json")
    assert rec.status == "env-error" and rec.error.message == "cannot build 5.2.0"
    assert finished[cells[0].id].status == "env-error"


def test_one_record_file_has_one_writer_and_the_driver_reads_none_back(monkeypatch, tmp_path: Path):
    """Every kind of cell in one run: captured by the worker, never finished (the worker died before it), env-error,
    hotfix-error. Each record path is written exactly once (no placeholder, no second stamp), the previous run's
    records are gone first, and the driver never reads a record (progress and exit status come with the results)."""
    records = tmp_path / "records"
    records.mkdir()
    writes: dict[str, int] = {}
    real_write = fs.write_atomic

    def counting(path, content):
        writes[Path(path).name] = writes.get(Path(path).name, 0) + 1
        return real_write(path, content)

    def no_reading(path):
        raise AssertionError(f"the driver read {path} back")

    def fake_worker(env, steps, tmp, *, timeout, on_result):  # in this process; it dies at a bfloat16 cell
        def one_capture(step):
            return 1, "", rec_io.error_record(step.cell, "load-error", "ImportError", "fake model failure", "")

        monkeypatch.setattr(worker, "_run_capture", one_capture)
        results: dict[int, worker.StepResult] = {}
        ran = [step for step in steps if step.cell.dtype == "float32"][:1]
        child.run_steps(ran, worker.capture_step, lambda r: results.setdefault(r.index, r) and on_result(r))
        return worker.WorkerExit(results, -9, "killed", None)

    def env_or_not(version, build, **kw):
        if version == "4.48.0":
            raise EnvironmentSetupError("no wheels for 4.48.0")
        return Env(tmp_path / "env", Path(sys.executable), version, build, reused=True)

    monkeypatch.setattr(fs, "write_atomic", counting)
    monkeypatch.setattr(rec_io, "load", no_reading)
    monkeypatch.setattr(runner, "run_worker", fake_worker)
    monkeypatch.setattr("opensci_patch.matrix.envs.ensure_env", env_or_not)
    monkeypatch.setattr(hotfix_cache, "run_hotfix", lambda variant, src, out: "opensci-patch: error: fake refusal\n")
    monkeypatch.setenv("OPENSCI_PATCH_ENV_ROOT", str(tmp_path / "env-root"))
    cells = [Cell("5.2.0", "cpu", "original"), Cell("5.2.0", "cpu", "original", "bfloat16"),
             Cell("5.2.0", "cpu", "patched"), Cell("4.48.0", "cpu", "original")]  # fmt: skip
    stale = records / f"{cells[1].id}.json"
    real_write(stale, rec_io.error_record(cells[1], "crash", "Old", "the previous run's record", ""))
    lines: list[str] = []

    finished = runner.run_cells(cells, FIXTURE_DIR, records, log=lines.append)
    assert writes == {f"{c.id}.json": 1 for c in cells}  # fails on a placeholder, or a record written twice
    assert {c: s.status for c, s in finished.items()} == {
        cells[0].id: "load-error",  # captured by the worker: its record
        cells[1].id: "crash",  # never finished: the driver's
        cells[2].id: "hotfix-error",
        cells[3].id: "env-error",
    }
    assert len([line for line in lines if line.startswith("[")]) == len(cells)
    assert f"{cells[3].id}: env-error (expected xfail, 0.0s)" in [line.split(" ", 1)[1] for line in lines[:-1]], lines
    assert runner.could_not_run(cells, finished) == [
        f"{cells[1].id}: crash: exit -9: killed",
        f"{cells[2].id}: hotfix-error: HotfixFailed: opensci-patch: error: fake refusal",
        f"{cells[3].id}: env-error: EnvironmentSetupError: no wheels for 4.48.0",
    ]


def test_a_cell_without_a_record_could_not_run(tmp_path: Path):
    """A cell the run never finished (it was stopped) has no summary: it counts as could-not-run, not as a result."""
    cells = [Cell("5.2.0", "cpu", "patched"), Cell("5.2.0", "cpu", "original")]
    ran = {cells[1].id: worker.CellSummary("load-error", 1.5, error="ImportError: no module")}
    assert runner.could_not_run(cells, ran) == [f"{cells[0].id}: no record: the cell never finished"]
