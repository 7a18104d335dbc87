"""matrix.md and summary.json written into the results directory as one pair, also when a run is killed.

The directory is checked before anything is computed; one report at a time writes into it; both files carry
one run id, and go through temp files, a journal and renames (`write_pair`, `finish_pair`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import secrets
from pathlib import Path

from opensci_patch._util import fs
from opensci_patch._util.errors import DestinationError
from opensci_patch._util.faults import fault_point


def check_results_dir(results_dir: Path) -> None:
    """One line (exit 2) before anything is computed or written, for a path that cannot hold results."""
    if results_dir.exists() and not results_dir.is_dir():
        raise DestinationError(f"{results_dir}: not a directory; pass --results a directory")
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DestinationError(
            f"{results_dir}: cannot create ({exc.strerror or exc}); pass a writable --results"
        ) from None
    if not os.access(results_dir, os.W_OK | os.X_OK):
        raise DestinationError(f"{results_dir}: not writable; pass a writable --results")


JOURNAL = ".report-pending.json"  # the renames a report run has still to make: present = unfinished


@contextlib.contextmanager
def results_lock(results_dir: Path):
    """One report at a time writes into a results directory (fcntl lock on `.report.lock`)."""
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock
        yield
        return
    with open(results_dir / ".report.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_pair(results_dir: Path, files: dict[str, str | dict]) -> None:
    """Write matrix.md and summary.json so that they are always of one run, also after a kill.

    Both go to temp files first; a journal naming the renames is written (atomically) before the first
    rename and removed after the last, so a run killed between the two renames is finished by the next
    one (`finish_pair`), and temp files of a run killed before its journal are removed by it.
    """
    with results_lock(results_dir):
        finish_pair(results_dir)
        renames = []
        try:
            for name, content in files.items():
                tmp = results_dir / f".{name}.{os.getpid()}-{secrets.token_hex(3)}.tmp"
                fs.write_atomic(tmp, content)
                renames.append([tmp.name, name])
            fault_point("report.temps")
            fs.write_atomic(results_dir / JOURNAL, {"renames": renames})
        except BaseException:
            for tmp, _ in renames:
                (results_dir / tmp).unlink(missing_ok=True)
            raise
        finish_pair(results_dir, between=lambda: fault_point("report.renamed-one"))


def finish_pair(results_dir: Path, between=lambda: None) -> None:
    """Make the renames a journal names (a killed run's, or this run's), then drop the journal and any
    temp file of ours that no journal names (a run killed before it wrote its journal). Hold `results_lock`."""
    journal = results_dir / JOURNAL
    try:
        renames = json.loads(journal.read_text())["renames"]
    except FileNotFoundError:
        renames = []
    except (OSError, ValueError, KeyError, TypeError):
        renames = []  # a torn journal cannot be: it is written atomically; treat it as none
    for i, (tmp, name) in enumerate(renames):
        if (results_dir / tmp).is_file():
            os.replace(results_dir / tmp, results_dir / name)
        if i == 0:
            between()
    journal.unlink(missing_ok=True)
    for name in ("matrix.md", "summary.json", JOURNAL):  # ours (.NAME.*.tmp) and write_atomic's of ours
        for leftover in [*results_dir.glob(f".{name}.*.tmp"), *results_dir.glob(f"..{name}.*.tmp")]:
            leftover.unlink(missing_ok=True)


def write_run(results_dir: Path, markdown: str, summary: dict) -> None:
    """`write_pair` of matrix.md and summary.json stamped with one run id (time, pid, random): a pair of two
    runs would show as two ids (matrix.md's second paragraph, summary.json's "run_id")."""
    run_id = f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
    markdown = markdown.replace("\n\n", f"\n\nReport run `{run_id}` (the same in summary.json).\n\n", 1)
    write_pair(results_dir, {"matrix.md": markdown, "summary.json": {**summary, "run_id": run_id}})
