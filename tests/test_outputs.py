"""Output paths (`_util.outputs`): what exists and is not ours to replace is refused before any work."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from conftest import one_line_exit_2


def test_capture_never_replaces_a_device_or_pipe_given_as_out_even_with_force(cli, model_dir: Path, tmp_path: Path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    proc = cli("capture", str(model_dir), "--out", str(fifo), "--force", "--max-new-tokens", "1")
    one_line_exit_2(proc, "not a regular file")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)  # still the pipe, not a JSON file

