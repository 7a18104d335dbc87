"""The capture worker: one process inside a release's env that captures cells in turn and streams typed results.

`python -m opensci_patch.matrix.worker` speaks the one child protocol (`_util/child.py`): a JSON list of
`CaptureStep`s on stdin, each run by calling `capture()` in this process, one `StepResult` line per finished step on
stdout (its value: the `CellSummary` the driver's progress line needs). A step writes its cell's record itself,
atomically, before its result line (the record's only writer: the driver writes only the records of cells that never
ran here): a crash costs only the steps that have no result line yet. `run` is the driver side, used by `runner`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from opensci_patch._util import child, fs, procs
from opensci_patch._util.child import StepResult, WorkerExit
from opensci_patch._util.procs import child_env
from opensci_patch.matrix.spec import Cell, Expectation
from opensci_patch.measure import records as rec_io


@dataclass(frozen=True)
class CaptureStep:
    """`capture()` of `model` (hotfixed already) as `cell` runs it; the cell's record goes to `final`."""

    model: Path
    cell: Cell
    final: Path  # records/<cell id>.json
    expected: Expectation
    reference: str = "auto"  # the fp64 reference forward: auto | on | off (`cell --reference`)


@dataclass(frozen=True)
class CellSummary:
    """A capture step's `StepResult.value`: what the driver says of a finished cell without reading its record back
    (the progress line and `runner.could_not_run`; the same values the record holds)."""

    status: str
    wall_s: float
    logit: float | None = None  # the target's logit and rank, when the forward ran
    rank: int | None = None
    error: str = ""  # "Type: message" of a record with an error

    @classmethod
    def of(cls, record: rec_io.Record) -> CellSummary:
        t, e = record.target, record.error
        error = f"{e.type}: {e.message}" if e else ""
        return cls(str(record.status), record.cell_wall_s, t and t.logit, t and t.rank, error)


def step_to_json(step: CaptureStep) -> dict:
    return {"model": str(step.model), "cell": asdict(step.cell), "final": str(step.final),
            "expected": asdict(step.expected), "reference": step.reference}  # fmt: skip


def step_from_json(data: dict) -> CaptureStep:
    cell, expected = Cell(**data["cell"]), Expectation(**data["expected"])
    return CaptureStep(Path(data["model"]), cell, Path(data["final"]), expected, data["reference"])


def finish(record: rec_io.Record, cell: Cell, expected: Expectation, wall_s: float) -> rec_io.Record:
    """The matrix-only fields of a cell record, stamped once by whoever writes it (the worker, or the driver for a
    cell that never ran)."""
    record.cell = rec_io.CellInfo.of(cell)
    record.expected = rec_io.Expected.of(expected)
    record.cell_wall_s = round(wall_s, 1)
    return record


# ---------------------------------------------------------------------------------------------------
# The worker side: runs inside the release's env.


def _run_capture(step: CaptureStep) -> tuple[int, str, rec_io.Record]:
    """The cell's record: the capture's own, or the run error that says why there is none."""
    from opensci_patch.measure.capture import CaptureSettings, capture
    from opensci_patch.measure.isolation import isolated_hf_cache

    cell = step.cell
    settings = CaptureSettings(
        model=step.model, device=cell.device, dtype=cell.dtype, attn=cell.attn, reference=step.reference
    )

    def run() -> rec_io.Record:
        with isolated_hf_cache():
            return capture(settings, log=lambda *a: None)

    rc, err, record = child.call(run)
    if record is None:
        return (
            rc,
            err,
            rec_io.error_record(
                cell, "crash", f"exit {rc}", procs.tail(err, 1) or "no record written", procs.tail(err)
            ),
        )
    return (0 if record.status == "ok" else 1), err, record


def _between_steps() -> None:
    # transformers logs some warnings once per process (an lru_cache): the next capture must see them too
    hf_logging = sys.modules.get("transformers.utils.logging")
    clear = getattr(getattr(hf_logging, "warning_once", None), "cache_clear", None)
    if clear is not None:
        clear()
    import gc

    gc.collect()  # the previous model's tensors, before the next one is loaded (peak memory)
    # What survives is long-lived (imported modules, caches): kept out of later collections, each of which then
    # scans only what one step made (a full collection with torch and transformers loaded costs ~170 ms a step)
    gc.freeze()


def capture_step(step: CaptureStep) -> child.StepOutcome:
    """Run one capture step: its record written (before its result line), its `CellSummary` as the value."""
    start = time.monotonic()
    rc, err, record = _run_capture(step)
    finish(record, step.cell, step.expected, time.monotonic() - start)
    fs.write_atomic(step.final, record)  # the record's one write: before its result line
    _between_steps()
    return rc, err, CellSummary.of(record)


def main() -> int:
    """The worker process: capture steps on stdin, results on stdout (`child.serve`)."""
    return child.serve("opensci-patch worker", step_from_json, capture_step)


# ---------------------------------------------------------------------------------------------------
# The driver side.


def run(env, steps: list[CaptureStep], tmp: Path, *, timeout: float,
        on_result: Callable[[StepResult], None]) -> WorkerExit:  # fmt: skip
    """Run `steps` in one worker in `env` (temp files under `tmp`); `on_result` as each finishes.

    A step that makes no progress for `timeout` seconds gets the worker killed (`timed_out`).
    """
    # its temp files (HF modules caches) go under the driver's run dir, removed with it; after a SIGKILL of the
    # driver the next run removes it (`fs.temp_dir`: our mark, a dead pid)
    env_vars = child_env({"TMPDIR": str(tmp)}, root=env.path.parent)
    payload = [step_to_json(s) for s in steps]
    return child.run(env.python, "opensci_patch.matrix.worker", payload, env_vars, timeout=timeout,
                     on_result=on_result, decode=lambda v: CellSummary(**v))  # fmt: skip


if __name__ == "__main__":  # `python -m opensci_patch.matrix.worker`: the module's own classes, not __main__'s copies
    from opensci_patch.matrix.worker import main as _main

    sys.exit(_main())
