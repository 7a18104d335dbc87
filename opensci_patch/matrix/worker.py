"""The worker: one process inside a release's env that captures cells in turn and streams typed results.

`python -m opensci_patch.matrix.worker` reads a JSON list of `CaptureStep`s on stdin, runs each by calling
`capture()` in this process, and writes one JSON line per finished step (`StepResult`, with the `CellSummary`
the driver's progress line needs) on stdout; everything else the steps print goes to stderr. A step writes
its cell's record itself, atomically, before its result line (the record's only writer: the driver writes
only the records of cells that never ran here): a crash costs only the steps that have no result line yet.
`run` is the driver side (start, follow, time out, kill), used by `runner`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from opensci_patch._util import fs, procs
from opensci_patch._util.errors import Terminated
from opensci_patch._util.procs import child_env, death_signal_setter
from opensci_patch.matrix.spec import Cell, Expectation
from opensci_patch.measure import records as rec_io

# Fault injection (tests only): a worker with more steps left kills itself (SIGKILL) right after
# finishing this many capture steps, as a segfault in the middle of a release would.
CRASH_AFTER_VAR = "OPENSCI_PATCH_BATCH_CRASH_AFTER"
LIVE: set[subprocess.Popen] = set()  # workers now running: a terminated driver terminates them
STOPPING = threading.Event()  # set by terminate_children: no new worker starts


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
    """What the driver says of a finished cell without reading its record back: the progress line and
    `runner.could_not_run` (the same values the record holds)."""

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


@dataclass(frozen=True)
class StepResult:
    index: int  # the step's position in the list the worker was given
    rc: int  # 0 ok; 1 the model code failed (recorded) or a bug; 2 bad input; 130/143 interrupted/terminated
    stderr: str  # the tail of what the step wrote on stderr
    cell: CellSummary  # what its record (written before this line) says


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


def _raise_terminated(signum, frame) -> None:
    raise Terminated()  # handled as Ctrl-C (exit 143): the step's cleanup runs, the worker stops after it


def _call(fn: Callable[[], object]) -> tuple[int, str, object]:
    """(exit code, stderr, value) of `fn()`, mapped as the CLI maps exceptions. Never raises."""
    from opensci_patch._util.errors import OpensciPatchError, exit_status

    buf, value = io.StringIO(), None
    with contextlib.redirect_stderr(buf):
        try:
            value, rc = fn(), 0
        except (OpensciPatchError, KeyboardInterrupt) as exc:
            rc, line = exit_status(exc)
            print(line, file=sys.stderr)
        except Exception:  # noqa: BLE001 - a bug in one step must not cost the steps after it
            traceback.print_exc()
            rc = 1
    return rc, buf.getvalue(), value


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

    rc, err, record = _call(run)
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


def run_steps(steps: list[CaptureStep], emit: Callable[[StepResult], None], *, crash_after: int = 0) -> int:
    """Run every step in this process, in order; `emit` each result. Returns 0, or 130/143 if interrupted."""
    for i, step in enumerate(steps):
        start = time.monotonic()
        rc, err, record = _run_capture(step)
        finish(record, step.cell, step.expected, time.monotonic() - start)
        fs.write_atomic(step.final, record)  # the record's one write: before its result line
        _between_steps()
        emit(StepResult(i, rc, procs.tail(err), CellSummary.of(record)))
        if rc in (130, 143):  # the step was interrupted or terminated (Ctrl-C, SIGTERM): so is the worker
            return rc
        if crash_after and i + 1 == crash_after and i < len(steps) - 1:
            os.kill(os.getpid(), signal.SIGKILL)
    return 0


def main() -> int:
    """The worker process: steps on stdin (JSON list), results on stdout (JSON lines)."""
    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever else is printed goes to stderr: stdout carries the results only
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        steps = [step_from_json(s) for s in json.load(sys.stdin)]
    except (ValueError, KeyError, TypeError) as exc:
        print(f"opensci-patch worker: error: stdin is not a list of steps ({exc})", file=sys.stderr)
        return 2

    def emit(result: StepResult) -> None:
        results.write(json.dumps(asdict(result)) + "\n")
        results.flush()

    return run_steps(steps, emit, crash_after=int(os.environ.get(CRASH_AFTER_VAR) or 0))


# ---------------------------------------------------------------------------------------------------
# The driver side.


def terminate_children() -> None:
    """SIGTERM every worker (they clean up as after Ctrl-C); called by the CLI's SIGTERM handler."""
    STOPPING.set()
    for proc in list(LIVE):
        with contextlib.suppress(OSError):
            proc.terminate()


@dataclass
class WorkerExit:
    results: dict[int, StepResult]  # by step index: the steps that finished
    returncode: int | None
    log: str  # the tail of the worker's stderr (and any stray stdout)
    timed_out: int | None = None  # the step that made no progress for `timeout` seconds


def run(
    env, steps: list[CaptureStep], tmp: Path, *, timeout: float, on_result: Callable[[StepResult], None]
) -> WorkerExit:
    """Run `steps` in one worker in `env` (temp files under `tmp`); `on_result` as each finishes.

    A step that makes no progress for `timeout` seconds gets the worker killed (`timed_out`).
    """
    if STOPPING.is_set():  # the driver was terminated: nothing new starts
        return WorkerExit({}, -signal.SIGTERM, "the driver was terminated (SIGTERM)", None)
    proc = subprocess.Popen(
        [str(env.python), "-m", "opensci_patch.matrix.worker"],
        # its temp files (HF modules caches) go under the driver's run dir, removed with it; after a SIGKILL of the
        # driver the next run removes it (`fs.temp_dir`: our mark, a dead pid)
        env=child_env({"TMPDIR": str(tmp)}, root=env.path.parent),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=death_signal_setter(),  # Linux: dies with the driver, never an orphan writing records
    )
    LIVE.add(proc)
    try:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(json.dumps([step_to_json(s) for s in steps]))
            proc.stdin.close()
        return _follow(proc, len(steps), timeout, on_result)
    finally:
        LIVE.discard(proc)


def _parse_result(line: str, count: int) -> StepResult | None:
    try:
        data = json.loads(line)
        result = StepResult(int(data["index"]), int(data["rc"]), str(data["stderr"]), CellSummary(**data["cell"]))
    except (ValueError, KeyError, TypeError):
        return None
    return result if 0 <= result.index < count else None


def _follow(proc: subprocess.Popen, count: int, timeout: float, on_result: Callable[[StepResult], None]) -> WorkerExit:
    lines: queue.Queue[str | None] = queue.Queue()
    logs: deque[str] = deque(maxlen=200)

    def pump(stream, results: bool) -> None:
        for line in stream:
            if results:
                lines.put(line)
            else:
                logs.append(line.rstrip("\n"))
        if results:
            lines.put(None)

    streams = ((proc.stdout, True), (proc.stderr, False))
    threads = [threading.Thread(target=pump, args=(s, r), daemon=True) for s, r in streams]
    for t in threads:
        t.start()
    results: dict[int, StepResult] = {}
    timed_out = None
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            timed_out = next((i for i in range(count) if i not in results), None)
            proc.kill()
            break
        if line is None:
            break
        result = _parse_result(line, count)
        if result is None:
            logs.append(line.rstrip("\n"))
            continue
        results[result.index] = result
        on_result(result)
    rc = proc.wait()
    for t in threads:
        t.join(timeout=5)
    return WorkerExit(results, rc, "\n".join(logs), timed_out)


if __name__ == "__main__":  # `python -m opensci_patch.matrix.worker`: the module's own classes, not __main__'s copies
    from opensci_patch.matrix.worker import main as _main

    sys.exit(_main())
