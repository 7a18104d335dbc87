"""Running matrix cells: per-release envs, shared hotfixes, one capture process per release, one record per cell.

What a cell is and what it must do is declared in `matrix` (stdlib only, read by the noxfile); this
module runs cells. Each cell runs in the per-release environment from `envs` (reused across runs) and
leaves exactly one JSON record, also when the environment cannot be built or a child process
crashes: then the record says so, with the tail of the log, and the other cells go on.

A run of many cells (`run_cells`, `opensci-patch cell`) costs about one import of torch and
transformers per release, not two per cell:

- Hotfix once per variant per run, in this process (`hotfix_cache`: kept across runs): the output
  depends on the source files and this tool's code, not on a release's env, so a release whose env
  cannot be built costs only its own cells. Each variant goes into a directory of its own basename (the
  remote-code module name under `transformers_modules` comes from it, so no two variants share one).
- One capture process per release (a `worker`, given typed steps) captures every cell of that
  release in turn: each from its own model dir, each in a fresh `isolated_hf_cache()` (private
  modules cache, `HF_HUB_OFFLINE=1`), each record written atomically as soon as it is done.
- Isolation when it fails: a crash of the shared process costs only the cells it had not finished;
  they are rerun one process per cell. A cell that makes no progress for `timeout` seconds is
  recorded as a timeout and the cells after it are rerun one per process. Bad input to a capture
  (exit 2) is recorded as a run error ("crash", "exit 2"), never as a failure of the model.
- Releases in parallel (`jobs`), one progress line per finished cell.

One writer per record: a run first removes the records of its cells left by an earlier run (a killed run
leaves no record of a cell it did not finish, never the previous result); the worker writes the record of
each cell it ran, and this module only those of cells that never ran there (env-error, hotfix-error, a crash
or timeout that never finished). What the progress line and `could_not_run` need comes with each worker's
`StepResult` (its value, a `CellSummary`): no record is read back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from opensci_patch._util import fs, procs
from opensci_patch._util.errors import EnvironmentSetupError, OpensciPatchError
from opensci_patch._util.faults import fault_point
from opensci_patch.matrix.hotfix_cache import hotfix_once
from opensci_patch.matrix.spec import VARIANTS, Cell, expectation
from opensci_patch.matrix.venv import check_settings
from opensci_patch.matrix.worker import CaptureStep, CellSummary, StepResult, finish
from opensci_patch.matrix.worker import run as run_worker
from opensci_patch.measure import records as rec_io

Log = Callable[[str], None]


def run_cell(
    cell: Cell, model_dir: Path, records: Path, *, env_root: Path | None = None, timeout: float = 900, log=print
) -> Path:
    """Run one cell (`run_cells([cell])`); always leaves `records/<cell.id>.json` and returns its path."""
    run_cells([cell], model_dir, records, env_root=env_root, timeout=timeout, log=log)
    return records / f"{cell.id}.json"


class _Progress:
    """One line per finished cell, numbered in finishing order, from any thread."""

    def __init__(self, total: int, log: Log):
        self.total, self.log, self.done = total, log, 0
        self.lock = threading.Lock()
        self.start = time.monotonic()

    def cell_done(self, cell: Cell, summary: CellSummary) -> None:
        ran = summary.logit is not None
        got = f"ran: ' Paris' logit {summary.logit:.4f} rank {summary.rank}" if ran else summary.status
        if ran and summary.status != "ok":
            got += f" ({summary.status})"
        with self.lock:
            self.done += 1
            self.log(
                f"[{self.done}/{self.total}] {cell.id}: {got} "
                f"(expected {expectation(cell).outcome}, {summary.wall_s}s)"
            )


@dataclass
class _Run:
    """What the releases of one run share: where things go, the hotfixed models, the envs."""

    records: Path
    tmp: Path
    env_root: Path | None
    timeout: float
    log: Log
    progress: _Progress
    reference: str = "auto"  # each capture's fp64 reference: auto | on | off
    # (checkpoint label, variant) -> model dir, or why there is none
    models: dict[tuple[str, str], Path | _NoModel] = field(default_factory=dict)
    envs: dict[tuple[str, str], object] = field(default_factory=dict)  # (release, build) -> Env or the error
    finished: dict[str, CellSummary] = field(default_factory=dict)  # cell id -> what its record says

    def env(self, version: str, build: str):
        """The env of a release (built at most once per run); an EnvironmentSetupError is returned, not raised."""
        from opensci_patch.matrix.envs import ensure_env

        key = (version, build)
        if key not in self.envs:
            try:
                self.envs[key] = ensure_env(version, build, root=self.env_root, log=lambda m: self.log(f"    {m}"))
            except EnvironmentSetupError as exc:
                self.envs[key] = exc
        return self.envs[key]

    def write(self, cell: Cell, record: rec_io.Record, wall_s: float) -> None:
        """The record of a cell that never ran in a worker (its only writer), and its progress line."""
        finish(record, cell, expectation(cell), wall_s)
        fs.write_atomic(self.records / f"{cell.id}.json", record)
        self.done(cell, CellSummary.of(record))

    def done(self, cell: Cell, summary: CellSummary) -> None:
        self.finished[cell.id] = summary
        self.progress.cell_done(cell, summary)


def run_cells(
    cells: list[Cell],
    model_dir: Path | dict[str, Path],
    records: Path,
    *,
    env_root: Path | None = None,
    jobs: int = 1,
    timeout: float = 900,
    log: Log = print,
    reference: str = "auto",
) -> dict[str, CellSummary]:
    """Run cells, `jobs` releases at a time; one record per cell, one progress line per cell. Returns what each
    finished cell's record says, by cell id (a cell missing there has no record: the run was stopped).

    `model_dir`: the checkpoint dir of every cell, or {checkpoint label: dir} for the cells' `Cell.checkpoint`.
    `reference`: each capture's fp64 reference forward (auto | on | off, as `capture --reference`)."""
    check_settings(env_root)  # a bad env root or variable: one line, before any record is touched
    records.mkdir(parents=True, exist_ok=True)
    for cell in cells:  # a killed run leaves no record of an unfinished cell, never the previous run's result
        (records / f"{cell.id}.json").unlink(missing_ok=True)
    fault_point("cell.cleared")  # tests/test_faults.py: the driver killed before any cell finished
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.transformers, cell.torch), []).append(cell)
    progress = _Progress(len(cells), log)
    dirs = model_dir if isinstance(model_dir, dict) else {c.checkpoint: model_dir for c in cells}
    with fs.temp_dir("opensci-run") as tmp:  # also removes those of killed runs (a SIGKILLed driver)
        run = _Run(records, tmp, env_root, timeout, log, progress, reference)
        wanted = list(dict.fromkeys((c.checkpoint, c.model) for c in cells))
        hotfix_variants(run, wanted, dirs)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for f in [pool.submit(run_release, run, group) for group in groups.values()]:
                f.result()
    log(f"{len(cells)} cells in {time.monotonic() - progress.start:.0f}s; records in {records}")
    return run.finished


@dataclass(frozen=True)
class _NoModel:
    """Why a variant has no model dir this run (its checkpoint or hotfix failed): each of its cells says so."""

    status: str
    type: str
    message: str
    log: str

    def record(self, cell: Cell) -> rec_io.Record:
        return rec_io.error_record(cell, self.status, self.type, self.message, self.log)


def hotfix_variants(run: _Run, wanted: list[tuple[str, str]], dirs: dict[str, Path]) -> None:
    """Fill `run.models`: each (checkpoint, variant)'s model dir, hotfixed once (in this process), or why not."""

    sources: dict[tuple[str, str], Path] = {}
    for key in wanted:
        name = key[1]
        source = dirs[key[0]]
        if VARIANTS[name].own_checkpoint:
            from opensci_patch.fixtures.own import ensure_checkpoint

            try:
                source = ensure_checkpoint(VARIANTS[name].checkpoint, run.env_root, log=lambda m: run.log(f"    {m}"))
            except EnvironmentSetupError as exc:
                run.models[key] = _NoModel("env-error", "EnvironmentSetupError", str(exc), str(exc))
                continue
        if VARIANTS[name].hotfix is None:
            run.models[key] = source
        else:
            sources[key] = source
    pairs = [(key[1], src) for key, src in sources.items()]
    made = hotfix_once(pairs, run.env_root, run.tmp, lambda m: run.log(f"    {m}"))
    for key, source in sources.items():
        got = made[(key[1], source)]
        if isinstance(got, Path):
            run.models[key] = got
        else:
            err = procs.tail(got)
            run.models[key] = _NoModel("hotfix-error", "HotfixFailed", procs.tail(err, 1) or "hotfix failed", err)


def _run_with_fallback(
    run: _Run, env, steps: list[CaptureStep], on_result: Callable[[StepResult], None]
) -> tuple[dict[int, StepResult], dict[int, tuple[str, str, str]]]:
    """All steps in one worker; after a crash or timeout, each unfinished step in a worker of its own.

    The step that was running when the shared worker crashed is rerun too (another cell may have
    caused it); the one that made no progress for `timeout` seconds is not (it would hang again).
    Returns the results by step index, and {step index: (error type, one-line message, log tail)}
    for the steps that never finished.
    """
    failed: dict[int, tuple[str, str, str]] = {}
    if not steps:
        return {}, failed
    outcome = run_worker(env, steps, run.tmp, timeout=run.timeout, on_result=on_result)
    results = dict(outcome.results)
    left = [i for i in range(len(steps)) if i not in results]
    if left and len(steps) > 1:
        what = (
            f"timed out in step {outcome.timed_out}" if outcome.timed_out is not None else f"exit {outcome.returncode}"
        )
        run.log(
            f"    the shared process ({env.transformers_version}) {what}: {len(left)} step(s) rerun one per process"
        )
    for i in left:
        alone = outcome
        if len(steps) > 1 and i != outcome.timed_out:
            alone = run_worker(
                env, [steps[i]], run.tmp, timeout=run.timeout, on_result=lambda r, i=i: on_result(_at(r, i))
            )
            if 0 in alone.results:
                results[i] = _at(alone.results[0], i)
                continue
        if alone.timed_out is not None:
            failed[i] = ("Timeout", f"no progress for {run.timeout:.0f}s", procs.tail(alone.log))
        else:
            message = procs.tail(alone.log, 1) or "no record written"
            failed[i] = (f"exit {alone.returncode}", message, procs.tail(alone.log))
    return results, failed


def _at(result: StepResult, index: int) -> StepResult:
    """A result of a step rerun alone, numbered as in the whole list."""
    return replace(result, index=index)


def run_release(run: _Run, cells: list[Cell]) -> None:
    """Every cell of one release: one worker for all of them, then the fallback for the rest."""

    start = time.monotonic()
    env = run.env(cells[0].transformers, cells[0].torch)
    if isinstance(env, EnvironmentSetupError):
        for cell in cells:
            run.write(cell, rec_io.error_record(cell, "env-error", "EnvironmentSetupError", str(env), str(env)), 0.0)
        return
    steps: list[CaptureStep] = []
    for cell in cells:
        model = run.models.get((cell.checkpoint, cell.model))
        if isinstance(model, _NoModel):  # hotfix or generated checkpoint failed: that variant's cells say so
            run.write(cell, model.record(cell), time.monotonic() - start)
            continue
        steps.append(CaptureStep(model, cell, run.records / f"{cell.id}.json", expectation(cell), run.reference))

    _, failed = _run_with_fallback(run, env, steps, lambda result: run.done(steps[result.index].cell, result.value))
    for i, (exc_type, message, log_text) in failed.items():  # never finished, not even alone: a run error
        cell = steps[i].cell
        run.write(cell, rec_io.error_record(cell, "crash", exc_type, message, log_text), time.monotonic() - start)


def main_cells(
    cells: list[Cell], model_dir: Path | dict[str, Path], records: Path, log=print, *, jobs: int = 1,
    reference: str = "auto",
) -> int:
    """Run cells (`jobs` releases at a time) with one progress line per cell; returns the number of cells that
    could not run (a run error, or never finished): the CLI's exit status is 1 if any."""
    finished = run_cells(cells, model_dir, records, jobs=jobs, log=log, reference=reference)
    return len(could_not_run(cells, finished))


def checkpoint_dirs(models: list[Path]) -> dict[str, Path]:
    """`cell --model DIR ...`: {checkpoint label: dir}, each dir checked (exit 2 when unusable); two dirs with
    one label (one basename) are refused, as their records and remote-code modules would collide."""
    from opensci_patch.matrix.spec import checkpoint_label
    from opensci_patch.measure.input_checks import validate_model_dir

    out: dict[str, Path] = {}
    for model in dict.fromkeys(Path(m).absolute() for m in models):
        validate_model_dir(model)
        label = checkpoint_label(model)
        if label in out:
            raise OpensciPatchError(
                f"--model {out[label]} and --model {model} have one name ({label!r}): their records would "
                "collide; copy one to a directory of another name"
            )
        out[label] = model
    return out


def could_not_run(cells: list[Cell], finished: dict[str, CellSummary]) -> list[str]:
    """'cell id: why' for each cell whose record says it could not run (env-error, crash, hotfix-error) or that
    has none (`run_cells`' result: what each finished cell's record says). A model failure (load-error, ...)
    ran: it is a result."""
    out = []
    for cell in cells:
        got = finished.get(cell.id)
        if got is None:
            out.append(f"{cell.id}: no record: the cell never finished")
        elif rec_io.Status(got.status).no_evidence:
            out.append(f"{cell.id}: {got.status}: {got.error}")
    return out
