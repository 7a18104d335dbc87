"""Running matrix cells: per-release envs, shared hotfixes, one capture process per release, one record per cell.

What a cell is and what it must do is declared in `matrix` (stdlib only, read by the noxfile); this
module runs cells. Each cell runs in the per-release environment from `envs` (reused across runs) and
leaves exactly one JSON record, also when the environment cannot be built or a child process
crashes: then the record says so, with the tail of the log, and the other cells go on.

A run of many cells (`run_cells`, `opensci-patch cell`) costs about one import of torch and
transformers per release, not two per cell:

- Hotfix once per variant per run. The hotfix output depends only on the source files and this
  tool's version, never on the installed transformers, so each variant is hotfixed once, in the
  first release's env, into the run's temp dir, each into a directory of its own basename (the
  remote-code module name under `transformers_modules` comes from it, so no two variants share one).
- One capture process per release (a `worker`, given typed steps) captures every cell of that
  release in turn: each from its own model dir, each in a fresh `isolated_hf_cache()` (private
  modules cache, `HF_HUB_OFFLINE=1`), each record written atomically as soon as it is done.
- Isolation when it fails: a crash of the shared process costs only the cells it had not finished;
  they are rerun one process per cell. A cell that makes no progress for `timeout` seconds is
  recorded as a timeout and the cells after it are rerun one per process. Bad input to a capture
  (exit 2) is recorded as a run error ("crash", "exit 2"), never as a failure of the model.
- Releases in parallel (`jobs`), one progress line per finished cell.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from opensci_patch._util import fs, procs
from opensci_patch._util.errors import EnvironmentSetupError, OpensciPatchError
from opensci_patch._util.faults import fault_point
from opensci_patch.matrix.hotfix_cache import hotfix_once
from opensci_patch.matrix.spec import VARIANTS, Cell, expectation
from opensci_patch.matrix.venv import check_settings
from opensci_patch.matrix.worker import CaptureStep, HotfixStep, Step, StepResult, finish
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

    def cell_done(self, cell: Cell, record: rec_io.Record) -> None:
        t = record.target
        got = f"ran: ' Paris' logit {t.logit:.4f} rank {t.rank}" if t else record.status
        if t and record.status != "ok":
            got += f" ({record.status})"
        with self.lock:
            self.done += 1
            self.log(
                f"[{self.done}/{self.total}] {cell.id}: {got} "
                f"(expected {record.expected and record.expected.outcome}, {record.cell_wall_s}s)"
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
    lock: threading.Lock = field(default_factory=threading.Lock)

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

    def write(self, cell: Cell, record: rec_io.Record, wall_s: float | None = None) -> None:
        if wall_s is not None:
            finish(record, cell, expectation(cell), wall_s)
        fs.write_atomic(self.records / f"{cell.id}.json", record)
        self.progress.cell_done(cell, record)


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
) -> int:
    """Run cells, `jobs` releases at a time; one record per cell, one progress line per cell. Returns the count.

    `model_dir`: the checkpoint dir of every cell, or {checkpoint label: dir} for the cells' `Cell.checkpoint`.
    `reference`: each capture's fp64 reference forward (auto | on | off, as `capture --reference`)."""
    check_settings(env_root)  # a bad env root or variable: one line, before any record says "running"
    records.mkdir(parents=True, exist_ok=True)
    for cell in cells:  # a killed run leaves "running", never the previous run's result
        fs.write_atomic(records / f"{cell.id}.json", rec_io.running_record(cell, expected=asdict(expectation(cell))))
    fault_point("cell.placeholders")  # tests/test_faults.py: the driver killed before any cell finished
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.transformers, cell.torch), []).append(cell)
    progress = _Progress(len(cells), log)
    dirs = model_dir if isinstance(model_dir, dict) else {c.checkpoint: model_dir for c in cells}
    with fs.temp_dir("opensci-run") as tmp:  # also removes those of killed runs (a SIGKILLed driver)
        run = _Run(records, tmp, env_root, timeout, log, progress, reference)
        wanted = list(dict.fromkeys((c.checkpoint, c.model) for c in cells))
        hotfix_variants(run, wanted, dirs, list(groups))
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for f in [pool.submit(run_release, run, group) for group in groups.values()]:
                f.result()
    log(f"{len(cells)} cells in {time.monotonic() - progress.start:.0f}s; records in {records}")
    return len(cells)


@dataclass(frozen=True)
class _NoModel:
    """Why a variant has no model dir this run (its checkpoint or hotfix failed): each of its cells says so."""

    status: str
    type: str
    message: str
    log: str

    def record(self, cell: Cell) -> rec_io.Record:
        return rec_io.error_record(cell, self.status, self.type, self.message, self.log)


def hotfix_variants(
    run: _Run, wanted: list[tuple[str, str]], dirs: dict[str, Path], releases: list[tuple[str, str]]
) -> None:
    """Fill `run.models`: each (checkpoint, variant)'s model dir, hotfixed once for the whole run (or why not)."""

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
    no_env: list[str] = []  # why there is no env to hotfix in, once the misses needed one

    def hotfix_in_first_env(steps: list[HotfixStep]) -> dict[int, StepResult]:
        env = None
        for version, build in releases:  # the first env that builds; the hotfix output does not depend on it
            env = run.env(version, build)
            if not isinstance(env, Exception):
                break
        if env is None or isinstance(env, Exception):
            no_env.append(f"no env to hotfix in: {env}")
            return {}
        results, failed = _run_with_fallback(run, env, steps, lambda _r: None)
        return results | {i: StepResult(i, -1, "\n".join(why[1:])) for i, why in failed.items()}

    pairs = [(key[1], src) for key, src in sources.items()]
    made = hotfix_once(pairs, run.env_root, run.tmp, hotfix_in_first_env, lambda m: run.log(f"    {m}"))
    for key, source in sources.items():
        got = made[(key[1], source)]
        if isinstance(got, Path):
            run.models[key] = got
        elif no_env:
            run.models[key] = _NoModel("env-error", "EnvironmentSetupError", no_env[0], no_env[0])
        else:
            err = got.stderr if got else "the hotfix process died\n"
            run.models[key] = _NoModel("hotfix-error", "HotfixFailed", procs.tail(err, 1) or "hotfix failed", err)


def _run_with_fallback(
    run: _Run, env, steps: list[Step], on_result: Callable[[StepResult], None]
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
    return StepResult(index, result.rc, result.stderr)


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

    def done(result: StepResult) -> None:
        step = steps[result.index]
        try:
            record = rec_io.load(step.final)
        except rec_io.RecordError as exc:
            record = rec_io.error_record(step.cell, "crash", "RecordError", str(exc), str(exc))
            run.write(step.cell, record, 0.0)
            return
        run.progress.cell_done(step.cell, record)

    _, failed = _run_with_fallback(run, env, steps, done)
    for i, (exc_type, message, log_text) in failed.items():  # never finished, not even alone: a run error
        cell = steps[i].cell
        run.write(cell, rec_io.error_record(cell, "crash", exc_type, message, log_text), time.monotonic() - start)


def main_cells(
    cells: list[Cell], model_dir: Path | dict[str, Path], records: Path, log=print, *, jobs: int = 1,
    reference: str = "auto",
) -> int:
    """Run cells (`jobs` releases at a time) with one progress line per cell; returns the number of cells that
    could not run (a run error, never finished, or no readable record): the CLI's exit status is 1 if any."""
    run_cells(cells, model_dir, records, jobs=jobs, log=log, reference=reference)
    return len(could_not_run(cells, records))


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


def could_not_run(cells: list[Cell], records: Path) -> list[str]:
    """'cell id: why' for each cell whose record says it could not run (env-error, crash, hotfix-error,
    running) or that left no readable record. A model failure (load-error, ...) ran: it is a result."""
    out = []
    for cell in cells:
        try:
            record = rec_io.load(records / f"{cell.id}.json")
        except rec_io.RecordError as exc:
            out.append(f"{cell.id}: {exc}")
            continue
        if record.status.no_evidence:
            err = record.error or rec_io.ErrorInfo("", "", "")
            out.append(f"{cell.id}: {record.status}: {err.type}: {err.message}")
    return out
