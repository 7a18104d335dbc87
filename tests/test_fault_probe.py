"""The fault probe of issue 20: each case that broke a promise, as a test that fails on the code before the fix."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest


def _one_line_exit_2(proc, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("opensci-patch: error:") and needle in lines[0], proc.stderr


# --- (1) destroys: --out that exists and is not a regular file ------------------------------------------------


def test_capture_never_replaces_a_device_or_pipe_given_as_out_even_with_force(cli, model_dir: Path, tmp_path: Path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    proc = cli("capture", str(model_dir), "--out", str(fifo), "--force", "--max-new-tokens", "1")
    _one_line_exit_2(proc, "not a regular file")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)  # still the pipe, not a JSON file


def test_write_atomic_refuses_to_replace_a_non_regular_file(tmp_path: Path):
    from opensci_patch.errors import DestinationError
    from opensci_patch.records import write_atomic

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(DestinationError, match="not a regular file"):
        write_atomic(fifo, {"a": 1})
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]  # no temp file left
