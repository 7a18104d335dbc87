"""Running matrix cells: one per-release env, one child process per step, exactly one record per cell.

What a cell is and what it must do is declared in `matrix` (stdlib only, read by the noxfile); this
module runs cells. Each cell runs in the per-release environment from `envs` (reused across runs) and
leaves exactly one JSON record, also when the environment cannot be built or the child process
crashes: then the record says so, with the tail of the log, and the other cells go on.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from . import records as rec_io
from .matrix import VARIANTS, Cell, cell_cli_args, expectation


def run_cell(
    cell: Cell, model_dir: Path, records: Path, *, env_root: Path | None = None, timeout: float = 900, log=print
) -> Path:
    """Run one cell; always leaves `records/<cell.id>.json` and returns its path.

    The previous run's record is replaced by a "running" placeholder before anything else happens,
    so a killed cell leaves "running" (the report lists it as never finished), never a stale result.
    """
    from .envs import ensure_env, run_python
    from .errors import EnvironmentSetupError

    records.mkdir(parents=True, exist_ok=True)
    out = records / f"{cell.id}.json"
    expected = asdict(expectation(cell))
    rec_io.write_atomic(out, rec_io.running_record(cell, expected=expected))
    start = time.monotonic()
    try:
        env = ensure_env(cell.transformers, cell.torch, root=env_root, log=log)
        if VARIANTS[cell.model].own_checkpoint:
            from .generated_style import ensure_generated

            model_dir = ensure_generated(env_root, log=log)
    except EnvironmentSetupError as exc:
        record = rec_io.error_record(cell, "env-error", "EnvironmentSetupError", str(exc), str(exc))
    else:
        with tempfile.TemporaryDirectory(prefix=f"opensci-{cell.id}-") as tmp:
            record = _capture_in_env(cell, env, model_dir, Path(tmp), timeout, run_python)
    record.cell = asdict(cell) | {"id": cell.id, "device": cell.device}
    record.expected = expected
    record.cell_wall_s = round(time.monotonic() - start, 1)
    rec_io.write_atomic(out, record)
    return out


def _capture_in_env(cell: Cell, env, model_dir: Path, tmp: Path, timeout: float, run_python):

    rec_path = tmp / "record.json"
    hotfix, capture = cell_cli_args(cell, model_dir, tmp, rec_path)
    cli = ["-m", "opensci_patch.cli"]
    if hotfix is not None:  # hotfix in the cell's own env: the driver needs no libcst or torch
        proc = run_python(env, [*cli, *hotfix], timeout=timeout)
        if proc.returncode != 0:
            return rec_io.error_record(
                cell,
                "hotfix-error",
                "HotfixFailed",
                rec_io.tail(proc.stderr, 1),
                rec_io.tail(proc.stdout + proc.stderr),
            )
    args = [*cli, *capture]
    try:
        proc = run_python(env, args, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return rec_io.error_record(cell, "crash", "Timeout", f"capture ran over {timeout:.0f}s", str(exc))
    if not rec_path.is_file():
        return rec_io.error_record(
            cell,
            "crash",
            f"exit {proc.returncode}",
            rec_io.tail(proc.stderr, 1) or "no record written",
            rec_io.tail(proc.stdout + proc.stderr),
        )
    try:
        return rec_io.load(rec_path)
    except rec_io.RecordError as exc:
        return rec_io.error_record(cell, "crash", "RecordError", str(exc), rec_io.tail(proc.stdout + proc.stderr))


def main_cells(cells: list[Cell], model_dir: Path, records: Path, log=print) -> int:
    """Run cells one after another with progress lines; returns the number of cells run."""

    total = len(cells)
    t0 = time.monotonic()
    for i, cell in enumerate(cells, 1):
        log(f"[{i}/{total}] {cell.id} ... ({time.monotonic() - t0:.0f}s elapsed)")
        rec = rec_io.load(run_cell(cell, model_dir, records, log=lambda m: log(f"    {m}")))
        t = rec.target
        got = f"ran: ' Paris' logit {t['logit']:.4f} rank {t['rank']}" if t else rec.status
        if t and rec.status != "ok":
            got += f" ({rec.status})"
        log(f"[{i}/{total}] {cell.id}: {got} (expected {rec.expected['outcome']}, {rec.cell_wall_s}s)")
    log(f"{total} cells in {time.monotonic() - t0:.0f}s; records in {records}")
    return total
