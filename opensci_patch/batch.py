"""The capture-batch process: one process per release that runs many cells' steps in turn.

`opensci-patch capture-batch PLAN.json` (hidden) runs inside a release's env (`run_plan`); the driver
side (`run_batch`) starts it, follows its progress lines and reports which steps finished, so that
`runner` can rerun the unfinished ones one per process after a crash or a timeout.

PLAN.json: {"steps": [step, ...]}; a step is {"argv": [opensci-patch arguments], "status": path} and,
for a capture step, also "cell" (asdict(Cell)), "expected", "record" (where capture writes) and
"final" (records/<cell id>.json). After each step the batch writes the step's status file
({"rc", "stderr"}) and, for a capture step, the cell's final record, then prints STEP_DONE.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import records as rec_io
from .envs_base import death_signal_setter
from .matrix import Cell

# Fault injection (tests only): a capture-batch process with more steps left kills itself (SIGKILL)
# right after finishing this many capture steps, as a segfault in the middle of a release would.
CRASH_AFTER_VAR = "OPENSCI_PATCH_BATCH_CRASH_AFTER"
STEP_DONE = "OPENSCI_PATCH_STEP_DONE"  # the batch's progress line on stdout: "<marker> <step index> <exit code>"
LIVE: set[subprocess.Popen] = set()  # capture-batch children now running: a terminated driver terminates them
STOPPING = threading.Event()  # set by terminate_children: no new capture-batch child starts


def terminate_children() -> None:
    """SIGTERM every capture-batch child (they clean up as after Ctrl-C); called by the CLI's SIGTERM handler."""
    STOPPING.set()
    for proc in list(LIVE):
        with contextlib.suppress(OSError):
            proc.terminate()


def finish(record: rec_io.Record, cell: Cell, expected: dict, wall_s: float) -> rec_io.Record:
    """The matrix-only fields of a cell record (the same in every path that writes one)."""
    record.cell = rec_io.CellInfo.of(cell)
    record.expected = rec_io.Expected.of(expected)
    record.cell_wall_s = round(wall_s, 1)
    return record


def capture_result(cell: Cell, rec_path: Path, returncode: int, log_text: str) -> rec_io.Record:
    """The record a capture step left, or the run error that says why there is none."""
    if not rec_path.is_file():
        return rec_io.error_record(
            cell,
            "crash",
            f"exit {returncode}",
            rec_io.tail(log_text, 1) or "no record written",
            rec_io.tail(log_text),
        )
    try:
        return rec_io.load(rec_path)
    except rec_io.RecordError as exc:
        return rec_io.error_record(cell, "crash", "RecordError", str(exc), rec_io.tail(log_text))


def run_plan(plan_path: Path) -> int:
    """Run every step of a batch plan in this process, in order; one status (and record) per step."""
    from .errors import OpensciPatchError

    try:
        steps = json.loads(Path(plan_path).read_text())["steps"]
        if not isinstance(steps, list) or not all(isinstance(s, dict) and "argv" in s for s in steps):
            raise ValueError("steps must be a list of objects with argv")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OpensciPatchError(f"{plan_path}: not a capture-batch plan ({exc}); it is written by `cell`") from None
    crash_after = int(os.environ.get(CRASH_AFTER_VAR) or 0)
    captures = 0
    for i, step in enumerate(steps):
        start = time.monotonic()
        rc, err = _run_step(step["argv"])
        if step.get("cell"):
            cell = Cell(**step["cell"])
            record = capture_result(cell, Path(step["record"]), rc, err)
            finish(record, cell, step["expected"], time.monotonic() - start)
            rec_io.write_atomic(Path(step["final"]), record)
            captures += 1
        rec_io.write_atomic(Path(step["status"]), {"rc": rc, "stderr": rec_io.tail(err)})
        print(f"{STEP_DONE} {i} {rc}", flush=True)
        if rc in (130, 143):  # the step was interrupted or terminated (Ctrl-C, SIGTERM): so is the batch
            return rc
        if crash_after and captures == crash_after and i < len(steps) - 1:
            os.kill(os.getpid(), signal.SIGKILL)
    return 0


def _run_step(argv: list[str]) -> tuple[int, str]:
    """One `opensci-patch` command in this process: (exit code, its stderr). Never raises."""
    from .cli import main

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse refusing the arguments
            rc = exc.code if isinstance(exc.code, int) else 2
        except Exception:  # noqa: BLE001 - a bug in one step must not cost the steps after it
            traceback.print_exc()
            rc = 1
    # transformers logs some warnings once per process (an lru_cache): the next capture must see them too
    hf_logging = sys.modules.get("transformers.utils.logging")
    clear = getattr(getattr(hf_logging, "warning_once", None), "cache_clear", None)
    if clear is not None:
        clear()
    import gc

    gc.collect()  # the previous model's tensors, before the next one is loaded (peak memory)
    return rc, buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# The driver.


@dataclass
class Step:
    argv: list[str]
    status: Path
    cell: Cell | None = None
    record: Path | None = None
    final: Path | None = None
    expected: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out: dict = {"argv": self.argv, "status": str(self.status)}
        if self.cell is not None:
            out |= {"cell": asdict(self.cell), "record": str(self.record), "final": str(self.final)}
            out["expected"] = self.expected
        return out


@dataclass
class _BatchOutcome:
    finished: set[int]  # indices of the steps that wrote their status
    returncode: int | None
    log: str  # the tail of stdout and stderr
    timed_out: int | None = None  # the step that made no progress for `timeout` seconds


def run_batch(
    env, steps: list[Step], plan_dir: Path, *, timeout: float, on_step: Callable[[int], None]
) -> _BatchOutcome:
    """Run `steps` in one `capture-batch` child of `env`; `on_step(i)` as each finishes.

    A step that makes no progress for `timeout` seconds gets the process killed (`timed_out`).
    """
    from .envs import child_env

    if STOPPING.is_set():  # the driver was terminated: nothing new starts
        return _BatchOutcome(set(), -signal.SIGTERM, "the driver was terminated (SIGTERM)", None)
    plan_dir.mkdir(parents=True, exist_ok=True)
    fd, plan_name = tempfile.mkstemp(dir=plan_dir, prefix="plan-", suffix=".json")
    os.close(fd)
    plan = Path(plan_name)
    rec_io.write_atomic(plan, {"steps": [s.to_json() for s in steps]})
    proc = subprocess.Popen(
        [str(env.python), "-m", "opensci_patch.cli", "capture-batch", str(plan)],
        # its temp files (HF modules caches) go under the driver's run dir: removed with it, even after a SIGKILL
        env=child_env({"TMPDIR": str(plan_dir.parent)}, root=env.path.parent),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=death_signal_setter(),  # Linux: dies with the driver, never an orphan writing records
    )
    LIVE.add(proc)
    try:
        return _follow(proc, steps, timeout, on_step)
    finally:
        LIVE.discard(proc)


def _follow(proc: subprocess.Popen, steps: list, timeout: float, on_step: Callable[[int], None]) -> _BatchOutcome:
    lines: queue.Queue[str | None] = queue.Queue()
    logs: deque[str] = deque(maxlen=200)

    def pump(stream, forward: bool) -> None:
        for line in stream:
            logs.append(line.rstrip("\n"))
            if forward:
                lines.put(line)
        if forward:
            lines.put(None)

    threads = [
        threading.Thread(target=pump, args=(s, f), daemon=True) for s, f in ((proc.stdout, True), (proc.stderr, False))
    ]
    for t in threads:
        t.start()
    finished: set[int] = set()
    timed_out = None
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            timed_out = next((i for i in range(len(steps)) if i not in finished), None)
            proc.kill()
            break
        if line is None:
            break
        m = re.match(rf"{STEP_DONE} (\d+) (-?\d+)$", line.strip())
        if m and int(m[1]) < len(steps):
            finished.add(int(m[1]))
            on_step(int(m[1]))
    rc = proc.wait()
    for t in threads:
        t.join(timeout=5)
    return _BatchOutcome(finished, rc, "\n".join(logs), timed_out)
