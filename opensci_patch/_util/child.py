"""The one child-process protocol: typed steps as JSON on stdin, one JSON `StepResult` line per step on stdout.

Every child that runs in a per-release env speaks it: the capture worker (`python -m opensci_patch.matrix.worker`,
capture steps) and diagnose's (`python -m opensci_patch.diagnose.worker`, probe, reference and compare steps). Each
entry module declares its step dataclasses, their JSON form and what running one means, and calls `serve`; its
driver calls `run`. Nothing here knows a step kind.

The child (`serve`): reads a JSON list of steps, runs each in turn in this process (`call`: exceptions mapped to
exit codes as the CLI maps them, never raised), writes one result line per finished step; everything else it prints
goes to stderr. SIGTERM is handled as Ctrl-C: the step's cleanup runs, then the child stops (exit 143).
The driver (`run`): starts the child, follows its results and log, kills it when a step makes no progress for
`timeout` seconds, and SIGTERMs every live child when it is itself terminated (`procs.terminate_children`).
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
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from opensci_patch._util import procs
from opensci_patch._util.errors import OpensciPatchError, Terminated, exit_status
from opensci_patch._util.procs import death_signal_setter, tail

# Fault injection (tests only): a child with more steps left kills itself (SIGKILL) right after finishing this many
# steps, as a segfault in the middle of a release would.
CRASH_AFTER_VAR = "OPENSCI_PATCH_BATCH_CRASH_AFTER"

StepOutcome = tuple[int, str, Any]  # (exit code, what the step wrote on stderr, its value)


@dataclass(frozen=True)
class StepResult:
    index: int  # the step's position in the list the child was given
    rc: int  # 0 ok; 1 a failure the step reports (recorded) or a bug; 2 bad input; 130/143 interrupted/terminated
    stderr: str  # the tail of what the step wrote on stderr
    value: Any = None  # what the step kind reports to the driver (a dataclass or JSON in the child, decoded by `run`)


# ---------------------------------------------------------------------------------------------------
# The child side.


def _raise_terminated(signum, frame) -> None:
    raise Terminated()  # handled as Ctrl-C (exit 143): the step's cleanup runs, the child stops after it


def call(fn: Callable[[], object]) -> StepOutcome:
    """(exit code, stderr, value) of `fn()`, mapped as the CLI maps exceptions. Never raises."""
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


def run_steps(steps: list, do: Callable[[Any], StepOutcome], emit: Callable[[StepResult], None], *,
              crash_after: int = 0) -> int:  # fmt: skip
    """`do` every step in this process, in order; `emit` each result. Returns 0, or 130/143 if interrupted."""
    for i, step in enumerate(steps):
        rc, err, value = do(step)
        emit(StepResult(i, rc, tail(err), value))
        if rc in (130, 143):  # the step was interrupted or terminated (Ctrl-C, SIGTERM): so is the child
            return rc
        if crash_after and i + 1 == crash_after and i < len(steps) - 1:
            os.kill(os.getpid(), signal.SIGKILL)
    return 0


def serve(prog: str, decode: Callable[[dict], Any], do: Callable[[Any], StepOutcome]) -> int:
    """The child process: steps on stdin (a JSON list, each read by `decode`), results on stdout (JSON lines)."""
    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever else is printed goes to stderr: stdout carries the results only
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        steps = [decode(s) for s in json.load(sys.stdin)]
    except (ValueError, KeyError, TypeError) as exc:
        print(f"{prog}: error: stdin is not a list of steps ({exc})", file=sys.stderr)
        return 2

    def emit(result: StepResult) -> None:
        results.write(json.dumps(asdict(result)) + "\n")
        results.flush()

    return run_steps(steps, do, emit, crash_after=int(os.environ.get(CRASH_AFTER_VAR) or 0))


# ---------------------------------------------------------------------------------------------------
# The driver side.


@dataclass
class WorkerExit:
    results: dict[int, StepResult]  # by step index: the steps that finished
    returncode: int | None
    log: str  # the tail of the child's stderr (and any stray stdout)
    timed_out: int | None = None  # the step that made no progress for `timeout` seconds


def run(python: Path, module: str, steps: list[dict], env: dict[str, str], *, timeout: float,
        on_result: Callable[[StepResult], None] = lambda r: None,
        decode: Callable[[Any], Any] = lambda v: v) -> WorkerExit:  # fmt: skip
    """`python -m module` with `env`, given `steps` (their JSON form); `on_result` as each finishes, its value
    read by `decode`. A step that makes no progress for `timeout` seconds gets the child killed (`timed_out`)."""
    if procs.STOPPING.is_set():  # the driver was terminated: nothing new starts
        return WorkerExit({}, -signal.SIGTERM, "the driver was terminated (SIGTERM)", None)
    proc = subprocess.Popen(
        [str(python), "-m", module],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=death_signal_setter(),  # Linux: dies with the driver, never an orphan writing outputs
    )
    procs.LIVE.add(proc)
    try:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(json.dumps(steps))
            proc.stdin.close()
        return _follow(proc, len(steps), timeout, on_result, decode)
    finally:
        procs.LIVE.discard(proc)


def _parse_result(line: str, count: int, decode: Callable[[Any], Any]) -> StepResult | None:
    try:
        data = json.loads(line)
        result = StepResult(int(data["index"]), int(data["rc"]), str(data["stderr"]), decode(data["value"]))
    except (ValueError, KeyError, TypeError):
        return None
    return result if 0 <= result.index < count else None


def _follow(proc: subprocess.Popen, count: int, timeout: float, on_result: Callable[[StepResult], None],
            decode: Callable[[Any], Any]) -> WorkerExit:  # fmt: skip
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
        result = _parse_result(line, count, decode)
        if result is None:
            logs.append(line.rstrip("\n"))
            continue
        results[result.index] = result
        on_result(result)
    rc = proc.wait()
    for t in threads:
        t.join(timeout=5)
    return WorkerExit(results, rc, "\n".join(logs), timed_out)
