"""demo --workdir W run again: refused with advice that works (`--force`), which replaces only what a demo wrote."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import FIXTURE_DIR

from opensci_patch import demo
from opensci_patch._util.errors import DestinationError
from opensci_patch.cli import build_parser
from opensci_patch.measure.records import load
from opensci_patch.rewrite.hotfix import hotfix


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def earlier(tmp_path: Path) -> Path:
    """A workdir as an earlier demo leaves it: the shipped checkpoint, its hotfix output, two capture records."""
    work = tmp_path / "work"
    shutil.copytree(FIXTURE_DIR, work / "opensci-tiny")
    hotfix(work / "opensci-tiny", work / "opensci-tiny_fixed", log=lambda _: None)
    for name in ("original", "patched"):
        shutil.copy(demo.REFERENCE_RECORD, work / f"record-{name}.json")
    return work


def test_a_rerun_is_refused_with_one_line_whose_advice_demo_accepts(cli, tmp_path: Path):
    work = tmp_path / "work"
    shutil.copytree(FIXTURE_DIR, work / "opensci-tiny")  # what `fixture W/opensci-tiny` or a first demo leaves
    before = _tree(work)
    proc = cli("demo", "--workdir", str(work))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "--force" in proc.stderr, proc.stderr
    args = build_parser(["demo"]).parse_args(["demo", "--workdir", str(work), "--force"])
    assert args.force is True
    assert _tree(work) == before


@pytest.mark.parametrize("what", ["edited-config", "user-file", "foreign-output", "not-a-record"])
def test_force_never_replaces_what_a_demo_did_not_write(earlier: Path, what: str):
    if what == "edited-config":
        with (earlier / "opensci-tiny" / "config.json").open("a") as f:
            f.write("\n")
    elif what == "user-file":
        (earlier / "opensci-tiny" / "notes.txt").write_text("mine\n")
    elif what == "foreign-output":
        shutil.rmtree(earlier / "opensci-tiny_fixed")
        (earlier / "opensci-tiny_fixed").mkdir()
        (earlier / "opensci-tiny_fixed" / "precious.bin").write_bytes(b"\x00")
    else:
        (earlier / "record-patched.json").write_text("my notes\n")
    before = _tree(earlier)
    with pytest.raises(DestinationError, match="never replaced"):
        demo.run(earlier, force=True, log=lambda _: None)
    assert _tree(earlier) == before


def test_force_runs_the_demo_again_in_an_earlier_workdir(cli, earlier: Path):
    old = load(earlier / "record-patched.json")
    proc = cli("demo", "--workdir", str(earlier), "--force")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MATCH with the transformers 4.48.0 reference" in proc.stdout
    new = load(earlier / "record-patched.json")
    assert new.created != old.created  # this run's capture, not the earlier file
