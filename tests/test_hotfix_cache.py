"""The matrix's hotfix cache (`hotfix_cache.hotfix_once`): a cached output is reused only while every file still has the
sha256 its manifest records; a changed, added or missing file makes it hotfixed again, said once on stderr."""

from __future__ import annotations

from pathlib import Path

import pytest

from opensci_patch._util.defaults import FIXTURE_DIR, MANIFEST
from opensci_patch.matrix import hotfix_cache
from opensci_patch.rewrite import hashed_copy

VARIANT = "patched"


@pytest.fixture
def ran(monkeypatch) -> list:
    """Every hotfix `hotfix_once` runs (it runs them in this process)."""
    calls: list = []
    real = hotfix_cache.run_hotfix
    monkeypatch.setattr(hotfix_cache, "run_hotfix", lambda *a: calls.append(a) or real(*a))
    return calls


def _once(root: Path, tmp: Path) -> Path:
    tmp.mkdir()
    made = hotfix_cache.hotfix_once([(VARIANT, FIXTURE_DIR)], root, tmp, lambda m: None)
    return made[(VARIANT, FIXTURE_DIR)]


TAMPER = {
    "edited": lambda d: (d / "modeling_opensci.py").write_text((d / "modeling_opensci.py").read_text() + "\nX = 1\n"),
    "added": lambda d: (d / "extra_module.py").write_text("import os\n"),
    "removed": lambda d: (d / "config.json").unlink(),
}


@pytest.mark.parametrize("how", sorted(TAMPER))
def test_a_tampered_cached_hotfix_is_made_again_not_reused(tmp_path: Path, capsys, how: str, ran: list):
    root = tmp_path / "envs"
    first = _once(root, tmp_path / "run1")
    cached = hotfix_cache.hotfix_cache_dir(root, FIXTURE_DIR, VARIANT)
    assert first != cached and (cached / MANIFEST).is_file() and len(ran) == 1
    assert _once(root, tmp_path / "run2") == cached and len(ran) == 1  # intact: reused, no hotfix run
    original = (cached / "modeling_opensci.py").read_bytes()

    TAMPER[how](cached)
    capsys.readouterr()
    third = _once(root, tmp_path / "run3")
    assert len(ran) == 2 and third != cached  # not reused: hotfixed again, from the source
    warned = [line for line in capsys.readouterr().err.splitlines() if "does not match its manifest" in line]
    assert len(warned) == 1 and str(cached) in warned[0]
    assert (third / "modeling_opensci.py").read_bytes() == original
    assert hashed_copy.mismatches(cached) == []  # the cache holds the new, intact output
    assert not any(p.name.startswith(f".{cached.name}.") for p in cached.parent.iterdir())  # nothing left aside
    assert _once(root, tmp_path / "run4") == cached and len(ran) == 2


def test_variants_map_to_hotfix_options():
    assert hotfix_cache.hotfix_options("structural") == ((), ("loss_kwargs", "rope_default", "tied_weights"))
    assert hotfix_cache.hotfix_options("patched+init") == (("init_weights",), None)
    assert hotfix_cache.hotfix_options("patched") == ((), None)


def test_a_failed_hotfix_maps_to_its_error_line_and_nothing_is_cached(tmp_path: Path, capsys):
    """In this process: the error as the CLI says it (here: SRC is no model dir, exit 2), never raised, nothing kept."""
    src = tmp_path / "src"
    src.mkdir()
    made = hotfix_cache.hotfix_once([(VARIANT, src)], tmp_path / "envs", tmp_path / "run", lambda m: None)
    why = made[(VARIANT, src)]
    assert isinstance(why, str) and why.startswith("opensci-patch: error: ") and str(src) in why
    assert not (tmp_path / "envs" / "_hotfix-cache").exists()
    assert capsys.readouterr() == ("", "")  # said through the result only
