"""fs: a finished directory into place (publish_dir), an output of ours replaced (swap_dir), a killed swap undone."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from opensci_patch._util import faults, fs
from opensci_patch._util.errors import DestinationError

REPO = Path(__file__).resolve().parents[1]
MARK = "ours.txt"


def _dir(path: Path, **files: str) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _files(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_publish_dir_renames_a_finished_dir_into_place(tmp_path: Path):
    tmp = _dir(fs.sibling(tmp_path / "out", "tmp"), a="1")
    assert fs.publish_dir(tmp, tmp_path / "out") is True
    assert _files(tmp_path / "out") == {"a": "1"} and not tmp.exists()


@pytest.mark.parametrize("what", ["dir", "file"])
def test_publish_dir_loses_a_race_without_touching_the_winner(tmp_path: Path, what: str):
    dst = tmp_path / "out"
    if what == "dir":
        _dir(dst, thesis="someone else's")
    else:
        dst.write_text("someone else's")
    tmp = _dir(fs.sibling(dst, "tmp"), a="1", **{MARK: ""})
    assert fs.publish_dir(tmp, dst, [MARK]) is False
    assert not tmp.exists()  # discarded
    assert (_files(dst) == {"thesis": "someone else's"}) if what == "dir" else dst.read_text() == "someone else's"


def test_publish_dir_raises_a_failure_that_is_not_a_race_and_leaves_tmp_to_the_caller(tmp_path: Path):
    tmp = _dir(tmp_path / ".tmp", a="1")
    with pytest.raises(FileNotFoundError):
        fs.publish_dir(tmp, tmp_path / "no-such-parent" / "out")
    assert _files(tmp) == {"a": "1"}


def test_swap_dir_replaces_an_output_of_ours_and_leaves_nothing_aside(tmp_path: Path):
    dst = _dir(tmp_path / "out", old="1", **{MARK: ""})
    new = _dir(fs.sibling(dst, "partial"), new="2")
    fs.swap_dir(new, dst, lambda p: (p / MARK).is_file(), [MARK])
    assert _files(dst) == {"new": "2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_swap_dir_never_replaces_a_directory_that_is_not_ours(tmp_path: Path):
    """Someone's directory took DST's place after the caller's check: it goes back untouched, nothing is deleted."""
    dst = _dir(tmp_path / "out", thesis="x")
    new = _dir(fs.sibling(dst, "partial"), new="2")
    with pytest.raises(DestinationError, match="left as it is"):
        fs.swap_dir(new, dst, lambda p: (p / MARK).is_file(), [MARK])
    assert _files(dst) == {"thesis": "x"} and _files(new) == {"new": "2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", new.name])


def test_swap_dir_puts_the_old_one_back_when_the_new_one_cannot_go_in(tmp_path: Path):
    dst = _dir(tmp_path / "out", old="1", **{MARK: ""})
    with pytest.raises(FileNotFoundError):
        fs.swap_dir(tmp_path / "missing", dst, lambda p: True, [MARK])
    assert _files(dst) == {"old": "1", MARK: ""}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


SWAP_KILLED = """
import sys
from pathlib import Path
from opensci_patch._util import fs
fs.swap_dir(Path(sys.argv[1]), Path(sys.argv[2]), lambda p: True, fault="test.swap")
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL")
def test_a_swap_killed_between_the_renames_is_put_back_by_restore_aside(tmp_path: Path):
    dst = _dir(tmp_path / "out", old="1", **{MARK: ""})
    new = _dir(tmp_path / ".new", new="2")
    env = {**os.environ, "PYTHONPATH": str(REPO), faults.FAULT_VAR: "test.swap:SIGKILL"}
    proc = subprocess.run([sys.executable, "-c", SWAP_KILLED, str(new), str(dst)], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not dst.exists() and new.is_dir()  # killed with the old one aside and the new one not in yet
    asides = fs.dead_siblings(dst, [fs.ASIDE])[fs.ASIDE]
    assert len(asides) == 1
    assert fs.restore_aside(dst, asides) == (True, [])
    assert _files(dst) == {"old": "1", MARK: ""}
    assert fs.restore_aside(dst, []) == (False, [])


def test_restore_aside_puts_back_the_newest_only_when_dst_is_missing(tmp_path: Path):
    dst, pid = tmp_path / "out", _dead_pid()
    older = _dir(tmp_path / f".out.{fs.ASIDE}-{pid}-0000000a", v="older")
    newer = _dir(tmp_path / f".out.{fs.ASIDE}-{pid}-0000000b", v="newer")
    os.utime(older, (1, 1))
    assert fs.restore_aside(dst, [newer, older]) == (True, [older])
    assert _files(dst) == {"v": "newer"}
    assert fs.restore_aside(dst, [older]) == (False, [older])  # dst is there: the swap finished or never began


def test_dead_siblings_are_those_of_gone_pids_with_our_name_pattern(tmp_path: Path):
    dst, dead = tmp_path / "out", _dead_pid()
    gone = _dir(tmp_path / f".out.partial-{dead}-0123abcd")
    _dir(tmp_path / f".out.partial-{os.getpid()}-0123abcd")  # a live run's
    _dir(tmp_path / f".other.partial-{dead}-0123abcd")  # another dst's
    _dir(tmp_path / f".out.partial-{dead}-nothex00")  # not our pattern
    (tmp_path / f".out.partial-{dead}-89abcdef").symlink_to(gone)  # a link is never followed into
    aside = _dir(tmp_path / f".out.{fs.ASIDE}-{dead}-4567abcd")
    assert fs.dead_siblings(dst, ["partial", fs.ASIDE]) == {"partial": [gone], fs.ASIDE: [aside]}


def test_remove_tree_removes_the_marks_last_and_ignores_a_missing_dir(tmp_path: Path, monkeypatch):
    path = _dir(tmp_path / "d", a="1", manifest="", **{MARK: ""})
    (path / "sub").mkdir()
    removed: list[str] = []
    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        removed.append(self.name)
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    fs.remove_tree(path, ["manifest", MARK])
    assert removed == ["a", "manifest", MARK] and not path.exists()
    fs.remove_tree(path)  # already gone: nothing to do
    assert not path.exists()


def test_sweep_trash_removes_only_marked_trash_of_dead_runs(tmp_path: Path):
    """A user's `.trash-*` folder is never deleted: only `.trash-<name>-<pid>-<hex>` with our mark and a dead pid."""
    dead, outside = _dead_pid(), _dir(tmp_path.parent / f"{tmp_path.name}-outside", **{fs.TRASH_MARK: ""})
    root = _dir(tmp_path / "envs")
    notes = _dir(root / ".trash-my-notes", **{"keep.txt": "user data"})
    named_like_ours = _dir(root / f".trash-x-{dead}-0123abcd", **{"keep.txt": "user data"})
    live = _dir(root / f".trash-y-{os.getpid()}-0123abcd", **{fs.TRASH_MARK: ""})
    (root / f".trash-z-{dead}-89abcdef").symlink_to(outside)
    ours = _dir(root / f".trash-tf4.48.0-cpu-py3.13-{dead}-4567abcd", a="1", **{fs.TRASH_MARK: ""})
    (ours / "sub").mkdir()
    fs.sweep_trash(root)
    assert not ours.exists()
    assert _files(notes) == {"keep.txt": "user data"} and _files(named_like_ours) == {"keep.txt": "user data"}
    assert live.is_dir() and _files(outside) == {fs.TRASH_MARK: ""}
    assert sorted(p.name for p in root.iterdir()) == sorted([notes.name, named_like_ours.name, live.name,
                                                             f".trash-z-{dead}-89abcdef"])  # fmt: skip


def test_discard_leaves_what_it_cannot_remove_marked_for_a_later_sweep(tmp_path: Path, monkeypatch):
    """An installer that outlived its driver keeps writing: the trash stays, marked and named with our pid."""
    env = _dir(tmp_path / "env", a="1")
    (env / "sub").mkdir()
    (env / "sub" / "b").write_text("2")
    monkeypatch.setattr(fs.shutil, "rmtree", lambda *a, **k: None)  # the orphan wins the race
    fs.discard(env, tmp_path)
    assert not env.exists()
    (trash,) = tmp_path.iterdir()
    assert trash.name.startswith(".trash-env-") and (trash / fs.TRASH_MARK).is_file()
    monkeypatch.undo()
    fs.sweep_trash(tmp_path)
    assert trash.exists()  # our own pid is alive: a live run's trash is not swept
    monkeypatch.setattr(fs, "pid_alive", lambda pid: False)
    fs.sweep_trash(tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- write_atomic never replaces what is not a regular file ---------------------------------------------------------


def test_write_atomic_refuses_to_replace_a_non_regular_file(tmp_path: Path):
    from opensci_patch._util.errors import DestinationError
    from opensci_patch._util.fs import write_atomic

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(DestinationError, match="not a regular file"):
        write_atomic(fifo, {"a": 1})
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]  # no temp file left

