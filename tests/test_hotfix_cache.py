"""The matrix's hotfix cache (`hotfix_cache.hotfix_once`): a cached output is reused only while every file still has the
sha256 its manifest records; a changed, added or missing file makes it hotfixed again, said once on stderr."""

from __future__ import annotations

from pathlib import Path

import pytest

from opensci_patch._util.defaults import FIXTURE_DIR, MANIFEST
from opensci_patch.matrix import hotfix_cache, worker
from opensci_patch.rewrite import hashed_copy

VARIANT = "patched"


def _hotfix_in_process(ran: list) -> object:
    def run_steps(steps: list[worker.HotfixStep]) -> dict[int, worker.StepResult]:
        ran.extend(steps)
        return {i: worker.StepResult(i, worker._run_hotfix(step)[0], "") for i, step in enumerate(steps)}

    return run_steps


def _once(root: Path, tmp: Path, ran: list) -> Path:
    tmp.mkdir()
    made = hotfix_cache.hotfix_once([(VARIANT, FIXTURE_DIR)], root, tmp, _hotfix_in_process(ran), lambda m: None)
    return made[(VARIANT, FIXTURE_DIR)]


TAMPER = {
    "edited": lambda d: (d / "modeling_opensci.py").write_text((d / "modeling_opensci.py").read_text() + "\nX = 1\n"),
    "added": lambda d: (d / "extra_module.py").write_text("import os\n"),
    "removed": lambda d: (d / "config.json").unlink(),
}


@pytest.mark.parametrize("how", sorted(TAMPER))
def test_a_tampered_cached_hotfix_is_made_again_not_reused(tmp_path: Path, capsys, how: str):
    root, ran = tmp_path / "envs", []
    first = _once(root, tmp_path / "run1", ran)
    cached = hotfix_cache.hotfix_cache_dir(root, FIXTURE_DIR, VARIANT)
    assert first != cached and (cached / MANIFEST).is_file() and len(ran) == 1
    assert _once(root, tmp_path / "run2", ran) == cached and len(ran) == 1  # intact: reused, no hotfix run
    original = (cached / "modeling_opensci.py").read_bytes()

    TAMPER[how](cached)
    capsys.readouterr()
    third = _once(root, tmp_path / "run3", ran)
    assert len(ran) == 2 and third != cached  # not reused: hotfixed again, from the source
    warned = [line for line in capsys.readouterr().err.splitlines() if "does not match its manifest" in line]
    assert len(warned) == 1 and str(cached) in warned[0]
    assert (third / "modeling_opensci.py").read_bytes() == original
    assert hashed_copy.mismatches(cached) == []  # the cache holds the new, intact output
    assert not any(p.name.startswith(f".{cached.name}.") for p in cached.parent.iterdir())  # nothing left aside
    assert _once(root, tmp_path / "run4", ran) == cached and len(ran) == 2
