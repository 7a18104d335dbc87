"""Temp dirs of ours in $TMPDIR (`fs.temp_dir`: a cell run's `opensci-run-*`, a capture's `opensci-hf-modules-*`):
removed at the end, and after a SIGKILL by the next run; only those it recognises as its own (its mark, this user,
a dead pid), never anything else in the temp directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from opensci_patch._util import fs
from opensci_patch._util.defaults import FIXTURE_DIR
from opensci_patch._util.procs import child_env

KILLED = """
import os, signal
from opensci_patch._util import fs
from opensci_patch.measure.isolation import isolated_hf_cache
with fs.temp_dir("opensci-run") as run:
    os.environ["TMPDIR"] = str(run)  # as the driver gives its worker
    import tempfile; tempfile.tempdir = None
    with isolated_hf_cache() as modules:
        (modules / "transformers_modules").mkdir()
        print(run, modules, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture
def tmpdir_here(tmp_path: Path, monkeypatch) -> Path:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    return tmp


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_dir_is_private_marked_and_removed_and_sweeps_only_its_own(tmpdir_here: Path):
    dead = _dead_pid()
    mine = tmpdir_here / f"opensci-run-{dead}-0123abcd"
    mine.mkdir()
    (mine / fs.TEMP_MARK).write_text("")
    (mine / "opensci-hf-modules-x").mkdir()
    kept = {
        f"opensci-run-{dead}-89abcdef": {},  # named like ours, unmarked: not ours
        f"opensci-run-{os.getpid()}-4567abcd": {fs.TEMP_MARK: ""},  # a live run's
        f"opensci-demo-{dead}-0123abcd": {fs.TEMP_MARK: ""},  # another prefix
        "opensci-run-notes": {"keep.txt": "user data"},
    }
    for name, files in kept.items():
        (tmpdir_here / name).mkdir()
        for file, text in files.items():
            (tmpdir_here / name / file).write_text(text)
    with fs.temp_dir("opensci-run") as tmp:
        assert tmp.parent == tmpdir_here and tmp.name.startswith(f"opensci-run-{os.getpid()}-")
        assert (tmp / fs.TEMP_MARK).is_file() and tmp.stat().st_mode & 0o777 == 0o700
        assert not mine.exists()
    assert not tmp.exists()
    assert sorted(p.name for p in tmpdir_here.iterdir()) == sorted(kept)
    assert (tmpdir_here / "opensci-run-notes" / "keep.txt").read_text() == "user data"


def test_a_sigkilled_run_leaves_its_temp_dirs_and_the_next_cell_run_removes_them(tmpdir_here: Path, tmp_path: Path):
    proc = subprocess.run([sys.executable, "-c", KILLED], env=child_env({"TMPDIR": str(tmpdir_here)}),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run, modules = map(Path, proc.stdout.split())
    assert modules.parent == run and (modules / "transformers_modules").is_dir()  # the killed run's, left
    from opensci_patch.matrix import runner

    runner.run_cells([], FIXTURE_DIR, tmp_path / "records", env_root=tmp_path / "envs", log=lambda m: None)
    assert list(tmpdir_here.iterdir()) == []


def test_a_capture_removes_the_modules_cache_a_killed_capture_left(tmpdir_here: Path):
    from opensci_patch.measure.isolation import isolated_hf_cache

    left = tmpdir_here / f"opensci-hf-modules-{_dead_pid()}-0123abcd"
    (left / "transformers_modules").mkdir(parents=True)
    (left / fs.TEMP_MARK).write_text("")
    with isolated_hf_cache() as modules:
        assert not left.exists() and modules.parent == tmpdir_here
    assert list(tmpdir_here.iterdir()) == []


# --- SIGTERM is handled as Ctrl-C: nothing left behind --------------------------------------------------------------


def _terminate_when(cmd: list[str], tmpdir: Path, ready, timeout: float = 300):
    """Start the CLI with a private TMPDIR, SIGTERM it once `ready()` holds, and return the finished process."""
    import signal
    import subprocess
    import sys
    import time

    from opensci_patch._util.procs import child_env

    tmpdir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "opensci_patch.cli", *cmd], env=child_env({"TMPDIR": str(tmpdir)}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be terminated"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_a_terminated_capture_leaves_no_modules_cache(model_dir: Path, tmp_path: Path):
    tmpdir = tmp_path / "tmp"
    rc, err = _terminate_when(["capture", str(model_dir), "--max-new-tokens", "20"], tmpdir,
                              lambda: any(tmpdir.glob("opensci-hf-modules-*/*")))  # fmt: skip
    assert rc == 143 and "terminated" in err, err
    assert list(tmpdir.iterdir()) == []


def test_a_terminated_cell_run_leaves_no_run_dir_or_modules_cache(tmp_path: Path):
    from opensci_patch.measure import records

    tmpdir, recs = tmp_path / "tmp", tmp_path / "records"
    cmd = ["cell", "--transformers", "4.48.0", "--torch", "system", "--variant", "patched", "--variant", "structural",
           "--records", str(recs)]  # fmt: skip
    rc, err = _terminate_when(cmd, tmpdir, lambda: any(tmpdir.glob("opensci-run-*/**/opensci-hf-modules-*")))
    assert rc == 143, err
    assert list(tmpdir.iterdir()) == []
    # never a result: the capture process stopped too, it did not go on to the next cell (and no placeholder either:
    # a cell it did not finish has no record)
    assert {records.load(p).status for p in recs.glob("*.json")} <= {"crash"}

