"""hotfix: never touches SRC, never replaces what it did not create, appears atomically, is idempotent."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from opensci_patch import __version__
from opensci_patch._util import faults
from opensci_patch._util.errors import DestinationError, ModelDirError, PatchError
from opensci_patch.rewrite import hashed_copy
from opensci_patch.rewrite import hotfix as hotfix_module
from opensci_patch.rewrite.destination import PARTIAL_MARK
from opensci_patch.rewrite.hotfix import MANIFEST, hotfix
from opensci_patch.rewrite.patches import default_patches

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "opensci_patch" / "data" / "opensci-tiny"


# the 4.3x-era patches of issue 29, not applicable to the shipped file
ISSUE_29 = ("legacy_cache", "generation_call", "config_aliases", "rope_scaling", "generation_defaults")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A small model dir: the fixture code and config, a fake multi-chunk weights file, a subfolder."""
    model = tmp_path / "models" / "opensci-tiny"
    model.mkdir(parents=True)
    for name in ("config.json", "configuration_opensci.py", "modeling_opensci.py"):
        shutil.copy(FIXTURE / name, model)
    (model / "model.safetensors").write_bytes(os.urandom(300_000))
    (model / "extra").mkdir()
    (model / "extra" / "notes.txt").write_text("kept as is\n")
    return model


@pytest.fixture
def quiet() -> list[str]:
    """A `log` that collects lines instead of printing them."""
    return []


@pytest.fixture(scope="module")
def patch_results() -> dict:
    return {}


@pytest.fixture(autouse=True)
def reuse_patch_results(monkeypatch, patch_results: dict) -> None:
    """Patching the same text gives the same result (test_patches checks that): compute it once per file here."""
    real = hotfix_module.apply_patches

    def cached(source, patches, filename="<source>", refused=None):
        patches = list(patches)
        key = (source, tuple(p.name for p in patches))
        if key not in patch_results:
            found: dict[str, list[str]] = {}
            patch_results[key] = (real(source, patches, filename, found), found)
        result, found = patch_results[key]
        if refused is not None:
            refused.update(found)
        return result

    monkeypatch.setattr(hotfix_module, "apply_patches", cached)


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (or 'dir') for everything under `root`."""
    return {
        p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_hotfix_writes_a_patched_copy_next_to_the_source(src: Path, quiet: list[str]):
    result = hotfix(src, log=quiet.append)
    assert result.dst == src.parent / "opensci-tiny_fixed"
    assert result.changed_files == 1
    # moved_helpers and auto_docstring_args target modular-generated files, rope_theta files that read a library
    # config's rope_theta, union_annotations PEP 604 annotations, the five of issue 29 4.3x-era files; the shipped,
    # hand-written one has none of their constructs (nor relative imports, nor a config parameter it drops), and its
    # __init__s already call post_init (remote_code applies: its config comes `from .configuration_opensci`)
    absent = ("moved_helpers", "auto_docstring_args", "rope_theta", "union_annotations",
              "relative_imports", "config_params", *ISSUE_29)  # fmt: skip
    assert result.summary == {
        p.name: "not-applicable" if p.name in absent else "already-applied" if p.name == "post_init" else "applied"
        for p in default_patches()
    }
    fixed = (result.dst / "modeling_opensci.py").read_text()
    assert "# opensci-patch: inv_freq_guard" in fixed
    assert "# opensci-patch: remote_code" in fixed
    assert (result.dst / "extra" / "notes.txt").read_text() == "kept as is\n"
    assert (result.dst / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert any("inv_freq_guard" in line and "applied" in line for line in quiet)
    assert any(str(result.dst) in line for line in quiet)


def test_source_is_never_modified(src: Path, quiet: list[str]):
    before = _tree(src)
    hotfix(src, log=quiet.append)
    hotfix(src, force=True, log=quiet.append)
    hotfix(src, check=True, log=quiet.append)
    assert _tree(src) == before


def test_weights_are_copied_not_hard_linked(src: Path, quiet: list[str]):
    result = hotfix(src, log=quiet.append)
    copied, original = (result.dst / "model.safetensors").stat(), (src / "model.safetensors").stat()
    assert copied.st_ino != original.st_ino
    assert original.st_nlink == 1


def test_symlinked_files_are_copied_as_files(src: Path, quiet: list[str], tmp_path: Path):
    """A Hugging Face cache snapshot links its files to blobs elsewhere; the output must hold real files."""
    blob = tmp_path / "blobs" / "abc123"
    blob.parent.mkdir()
    (src / "model.safetensors").rename(blob)
    (src / "model.safetensors").symlink_to(blob)
    result = hotfix(src, log=quiet.append)
    copied = result.dst / "model.safetensors"
    assert not copied.is_symlink()
    assert copied.read_bytes() == blob.read_bytes()


def test_manifest_records_version_source_statuses_and_hashes_of_every_file(src: Path, quiet: list[str], monkeypatch):
    monkeypatch.setattr(hashed_copy, "CHUNK", 4096)  # hash across many chunks
    result = hotfix(src, log=quiet.append)
    manifest = json.loads((result.dst / MANIFEST).read_text())
    assert manifest["tool"] == "opensci-patch" and manifest["version"] == __version__
    assert manifest["source"] == str(src.resolve())
    assert dt.datetime.fromisoformat(manifest["created_utc"]).utcoffset() == dt.timedelta(0)
    assert manifest["patches"]["sdpa_gqa"] == {"status": "applied", "default": True}
    outputs = {k: v for k, v in _tree(result.dst).items() if v != "dir" and k != MANIFEST}
    inputs = {k: v for k, v in _tree(src).items() if v != "dir"}
    assert set(manifest["files"]) == set(outputs) == set(inputs)
    for path, entry in manifest["files"].items():
        assert entry["sha256_in"] == inputs[path]
        assert entry["sha256_out"] == outputs[path]
    assert manifest["files"]["modeling_opensci.py"]["patches"]["tied_weights"] == "applied"
    assert manifest["files"]["configuration_opensci.py"]["patches"]["tied_weights"] == "not-applicable"


def test_hotfixing_a_fixed_dir_changes_nothing(src: Path, quiet: list[str], tmp_path: Path):
    first = hotfix(src, log=quiet.append)
    quiet.clear()
    second = hotfix(first.dst, tmp_path / "again", log=quiet.append)
    assert second.changed_files == 0
    assert set(second.summary.values()) == {"already-applied", "not-applicable"}
    assert second.summary["moved_helpers"] == "not-applicable"
    assert second.diff == ""
    absent = 6 + len(ISSUE_29)  # moved_helpers, auto_docstring_args, rope_theta, union_annotations,
    # relative_imports, config_params, ...: not in the shipped one
    assert sum("already patched: nothing to change" in line for line in quiet) == len(default_patches()) - absent
    assert {k: v for k, v in _tree(second.dst).items() if k != MANIFEST} == {
        k: v for k, v in _tree(first.dst).items() if k != MANIFEST
    }


def test_check_mode_writes_nothing_and_returns_the_diff(src: Path, quiet: list[str]):
    before = _tree(src.parent)
    result = hotfix(src, check=True, log=quiet.append)
    assert _tree(src.parent) == before
    assert not result.dst.exists()
    assert result.check and result.changed_files == 1
    assert '-    _tied_weights_keys = ["lm_head.weight"]' in result.diff
    assert '+    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}' in result.diff
    assert result.diff.startswith("--- a/modeling_opensci.py\n+++ b/modeling_opensci.py\n")
    assert any("nothing written" in line for line in quiet)


def test_opt_in_patch_is_applied_only_when_named(src: Path, quiet: list[str], tmp_path: Path):
    plain = hotfix(src, tmp_path / "plain", log=quiet.append)
    extra = hotfix(src, tmp_path / "extra", extras=["init_weights"], log=quiet.append)
    assert "init_weights" not in plain.summary
    assert extra.summary["init_weights"] == "applied"
    assert ".data.normal_" in (plain.dst / "modeling_opensci.py").read_text()
    assert ".data.normal_" not in (extra.dst / "modeling_opensci.py").read_text()
    with pytest.raises(PatchError, match="unknown patch"):
        hotfix(src, tmp_path / "bad", extras=["no_such_patch"], log=quiet.append)


def test_existing_output_is_replaced_only_with_force(src: Path, quiet: list[str]):
    result = hotfix(src, log=quiet.append)
    (result.dst / "mine.txt").write_text("user data")
    with pytest.raises(DestinationError, match="--force"):
        hotfix(src, log=quiet.append)
    assert (result.dst / "mine.txt").read_text() == "user data"
    hotfix(src, force=True, log=quiet.append)
    assert not (result.dst / "mine.txt").exists()
    assert (result.dst / MANIFEST).is_file()
    assert _leftovers(src.parent) == []


def test_directory_not_created_by_hotfix_is_never_replaced_even_with_force(src: Path, quiet: list[str]):
    foreign = src.parent / "opensci-tiny_fixed"
    foreign.mkdir()
    (foreign / "precious.bin").write_bytes(b"\x00\x01")
    for force in (False, True):
        with pytest.raises(DestinationError, match="not created by opensci-patch"):
            hotfix(src, force=force, log=quiet.append)
    assert _tree(foreign) == {"precious.bin": hashlib.sha256(b"\x00\x01").hexdigest()}


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_overlapping_the_source_is_refused(src: Path, quiet: list[str], where: str):
    dst = {"same": src, "inside": src / "fixed", "parent": src.parent}[where]
    before = _tree(src.parent)
    with pytest.raises(DestinationError, match="source"):
        hotfix(src, dst, force=True, log=quiet.append)
    assert _tree(src.parent) == before


def test_failing_patch_leaves_no_output_and_no_partial_dir(src: Path, quiet: list[str], monkeypatch):
    def explode(*args, **kwargs):
        raise PatchError("patch 'tied_weights' cannot rewrite modeling_opensci.py: simulated")

    monkeypatch.setattr(hotfix_module, "apply_patches", explode)
    with pytest.raises(PatchError, match="simulated"):
        hotfix(src, log=quiet.append)
    assert sorted(p.name for p in src.parent.iterdir()) == ["opensci-tiny"]


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "replacing"])
def test_interrupt_while_copying_leaves_no_partial_output(src: Path, quiet: list[str], monkeypatch, existing: bool):
    """Ctrl-C half-way through the copy: no half-written DST; an earlier output survives untouched."""
    if existing:
        hotfix(src, log=quiet.append)
    before = _tree(src.parent)
    real_copy, copied = hashed_copy._copy_hashing, []

    def interrupted(source: Path, target: Path) -> str:
        if copied:
            raise KeyboardInterrupt
        copied.append(source)
        return real_copy(source, target)

    monkeypatch.setattr(hashed_copy, "_copy_hashing", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hotfix(src, force=True, log=quiet.append)
    assert copied  # it really was interrupted mid-way
    assert _tree(src.parent) == before
    assert _leftovers(src.parent) == []


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "no such directory"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "not a directory"),
        (lambda p: (p / "no-config" / "modeling_x.py").parent, "no config.json"),
        (lambda p: (p / "no-code" / "config.json").parent, "no modeling_"),
    ],
    ids=["missing", "file", "no-config", "no-modeling"],
)
def test_unusable_source_raises_model_dir_error(tmp_path: Path, quiet: list[str], make, message: str):
    for folder, name in (("no-config", "modeling_x.py"), ("no-code", "config.json")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_text("{}")
    with pytest.raises(ModelDirError, match=message):
        hotfix(make(tmp_path), tmp_path / "out", log=quiet.append)
    assert not (tmp_path / "out").exists()


# --- concurrency, leftovers of killed runs, the swap re-check (issue 11) ----------------------------------------


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _stopped(proc: subprocess.Popen) -> bool:
    """Wait until the child `proc` stops (SIGSTOP at a fault point); False if it exits first.

    waitpid(WUNTRACED) returns when the child stops or exits: no polling, no timer."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    if os.WIFSTOPPED(status):
        return True
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen
    return False


@pytest.mark.parametrize("what", ["user-dir", "user-file", "earlier-output"])
def test_output_that_appears_during_the_run_is_never_replaced(src: Path, quiet: list[str], monkeypatch, what: str):
    """`hotfix big --out race & mkdir race; echo x > race/thesis.txt`: thesis.txt must survive, the run must fail."""
    dst = src.parent / "race"
    real_copy = hashed_copy._copy_hashing

    def appear(source: Path, target: Path) -> str:
        if not os.path.lexists(dst):
            if what == "user-file":
                dst.write_text("x\n")
            else:
                dst.mkdir()
                (dst / "thesis.txt").write_text("x\n")
                if what == "earlier-output":  # ours, but this run has no --force
                    (dst / MANIFEST).write_text(json.dumps({"tool": "opensci-patch"}))
        return real_copy(source, target)

    monkeypatch.setattr(hashed_copy, "_copy_hashing", appear)
    with pytest.raises(DestinationError, match="while the output was being written"):
        hotfix(src, dst, log=quiet.append)
    if what == "user-file":
        assert dst.read_text() == "x\n"
    else:
        assert (dst / "thesis.txt").read_text() == "x\n"
    assert _leftovers(src.parent) == []


@pytest.mark.skipif(not hasattr(os, "WUNTRACED"), reason="waits for the first run to stop (POSIX waitpid)")
def test_second_run_to_the_same_output_fails_at_once_while_the_first_holds_it(src: Path, quiet: list[str], cli):
    env = {**os.environ, "PYTHONPATH": str(REPO), faults.FAULT_VAR: "hotfix.copied:SIGSTOP"}
    dst = src.parent / "out"
    first = subprocess.Popen(
        [sys.executable, "-m", "opensci_patch.cli", "hotfix", str(src), "--out", str(dst)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _stopped(first), first.communicate(timeout=60)
        with pytest.raises(DestinationError, match="another hotfix is writing"):
            hotfix(src, dst, log=quiet.append)
        with pytest.raises(DestinationError, match="another hotfix is writing"):
            hotfix(src, dst, force=True, log=quiet.append)
        second = cli("hotfix", str(src), "--out", str(dst))
        assert second.returncode == 2
        assert second.stderr.count("\n") == 1 and "another hotfix is writing" in second.stderr
        assert not dst.exists()
    finally:
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert _made_by_us_manifest(dst)
    assert _leftovers(src.parent) == []  # no partial dir, no lock file


def _made_by_us_manifest(path: Path) -> bool:
    return json.loads((path / MANIFEST).read_text())["tool"] == "opensci-patch"


def test_leftovers_of_killed_runs_are_removed_by_the_next_run_and_nothing_else(src: Path, quiet: list[str]):
    parent, dead = src.parent, _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stale = parent / f".opensci-tiny_fixed.partial-{dead}-0123abcd"
        stale.mkdir()
        (stale / PARTIAL_MARK).write_text(f"pid {dead}")
        (stale / "model.safetensors").write_bytes(b"half")
        stale_done = parent / f".opensci-tiny_fixed.partial-{dead}-4567abcd"  # killed after the manifest
        stale_done.mkdir()
        (stale_done / MANIFEST).write_text(json.dumps({"tool": "opensci-patch"}))
        alive = parent / f".opensci-tiny_fixed.partial-{live.pid}-89abcdef"
        alive.mkdir()
        (alive / PARTIAL_MARK).write_text(f"pid {live.pid}")
        foreign = parent / f".opensci-tiny_fixed.partial-{dead}-deadbeef"  # our name pattern, not our content
        foreign.mkdir()
        (foreign / "precious.txt").write_text("user data")
        other_output = parent / f".other_fixed.partial-{dead}-0123abcd"  # another DST's: not this run's business
        other_output.mkdir()
        (other_output / PARTIAL_MARK).write_text("")
        result = hotfix(src, log=quiet.append)
        assert not stale.exists() and not stale_done.exists()
        assert alive.is_dir() and (foreign / "precious.txt").read_text() == "user data" and other_output.is_dir()
        assert sum("left by an interrupted hotfix" in line for line in quiet) == 2
        assert _made_by_us_manifest(result.dst)
    finally:
        live.kill()
        live.wait()


def test_an_output_moved_aside_by_a_killed_swap_is_put_back(src: Path, quiet: list[str]):
    first = hotfix(src, log=quiet.append)
    before = _tree(first.dst)
    aside = src.parent / f".opensci-tiny_fixed.old-{_dead_pid()}-0123abcd"
    first.dst.rename(aside)  # what SIGKILL between the two renames of a --force run leaves
    with pytest.raises(DestinationError, match="--force"):
        hotfix(src, log=quiet.append)  # the previous output is back, so without --force nothing is replaced
    assert _tree(first.dst) == before
    assert _leftovers(src.parent) == []


def test_output_in_a_directory_that_cannot_be_written_is_one_clear_error(src: Path, quiet: list[str], monkeypatch):
    """As root (this project's machines) chmod does not stop writes: simulate EACCES where the lock is created."""
    real_open = os.open

    def denied(path, flags, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(DestinationError, match="cannot write in .*Permission denied.*writable directory"):
        hotfix(src, src.parent / "out", log=quiet.append)
    assert not (src.parent / "out").exists()


# --- bad inputs: one line, exit 2 ------------------------------------------------------------------------------


def test_two_links_to_one_directory_are_copied_not_called_a_loop(src: Path, quiet: list[str], tmp_path: Path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "vocab.txt").write_text("a b c\n")
    (src / "one").symlink_to(shared)
    (src / "two").symlink_to(shared)
    result = hotfix(src, log=quiet.append)
    for name in ("one", "two"):
        assert not (result.dst / name).is_symlink()
        assert (result.dst / name / "vocab.txt").read_text() == "a b c\n"


def test_a_real_symlink_loop_is_one_error_naming_the_link(src: Path, quiet: list[str], cli):
    (src / "extra" / "back").symlink_to(src)
    with pytest.raises(ModelDirError, match="symbolic link loop"):
        hotfix(src, log=quiet.append)
    proc = cli("hotfix", str(src))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "extra/back" in proc.stderr
    assert _leftovers(src.parent) == [] and not (src.parent / "opensci-tiny_fixed").exists()


@pytest.mark.parametrize("kind", ["broken-link", "fifo"])
def test_entries_that_are_not_files_or_directories_are_refused_with_their_path(src: Path, cli, kind: str):
    """A dangling link has nothing to copy; reading a FIFO would block the copy forever."""
    bad = src / "extra" / "odd"
    if kind == "fifo":
        os.mkfifo(bad)
    else:
        bad.symlink_to(src / "gone")
    proc = cli("hotfix", str(src), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and str(bad) in proc.stderr
    assert _leftovers(src.parent) == [] and not (src.parent / "opensci-tiny_fixed").exists()


def test_symlinked_source_puts_the_default_output_next_to_the_link(src: Path, quiet: list[str], tmp_path: Path):
    """The user named the link; the output belongs where they look, not in the (maybe read-only) target's dir."""
    where = tmp_path / "links"
    where.mkdir()
    (where / "osr").symlink_to(src)
    result = hotfix(where / "osr", log=quiet.append)
    assert result.dst == where / "osr_fixed"
    assert (where / "osr_fixed" / MANIFEST).is_file()
    assert not (src.parent / "opensci-tiny_fixed").exists()


@pytest.mark.parametrize("case", ["dst-is-a-file", "src-is-dst", "dst-is-a-link", "dst-parent-is-a-file"])
def test_bad_destinations_are_one_line_and_exit_2(src: Path, cli, case: str):
    dst = {
        "dst-is-a-file": src.parent / "file",
        "src-is-dst": src,
        "dst-is-a-link": src.parent / "link",
        "dst-parent-is-a-file": src.parent / "file" / "out",
    }[case]
    (src.parent / "file").write_text("mine\n")
    (src.parent / "elsewhere").mkdir()
    (src.parent / "link").symlink_to(src.parent / "elsewhere")
    before = _tree(src.parent)
    proc = cli("hotfix", str(src), "--out", str(dst), "--force")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert _tree(src.parent) == before


# --- SIGTERM is handled as Ctrl-C: nothing left behind --------------------------------------------------------------


def test_a_terminated_hotfix_leaves_nothing_behind(tmp_path: Path):
    import subprocess
    import sys

    from opensci_patch._util import faults
    from opensci_patch._util.defaults import FIXTURE_DIR
    from opensci_patch._util.procs import child_env

    dst = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "opensci_patch.cli", "hotfix", str(FIXTURE_DIR), "--out", str(dst)],
                          env=child_env({faults.FAULT_VAR: "hotfix.copied:SIGTERM"}), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 143, proc.stderr
    assert list(tmp_path.iterdir()) == []  # no .out.partial-*, no .out.lock

