"""Shared fixtures: fresh copies of the shipped checkpoint and a CLI runner; the check of a bad-input refusal."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DIR = REPO / "opensci_patch" / "data" / "opensci-tiny"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A private copy of the shipped open-sci checkpoint (tests may mutate it)."""
    dst = tmp_path / "opensci-tiny"
    shutil.copytree(FIXTURE_DIR, dst)
    return dst


def structural_copy(dst: Path) -> Path:
    """The shipped checkpoint with only the three structural fixes, as a naive fix leaves it (RoPE broken on 5.x)."""
    from opensci_patch.matrix.spec import STRUCTURAL
    from opensci_patch.rewrite.patches import apply_patches, by_name

    shutil.copytree(FIXTURE_DIR, dst)
    modeling = dst / "modeling_opensci.py"
    source, status = apply_patches(modeling.read_text(), [by_name(n) for n in STRUCTURAL], modeling.name)
    assert set(status.values()) == {"applied"}
    modeling.write_text(source)
    return dst


DROP_CACHE_AT = "        if use_cache and past_key_values is None:\n"


def cache_dropping_copy(dst: Path) -> Path:
    """The hotfixed shipped checkpoint whose model forward drops the KV cache it is handed.

    A fault injected for the decode-loop checks: `past_key_values = None` right before the model
    builds its own cache, so every decode step attends only to itself (what 5.24's `cache=` did to
    a forward that reads only `past_key_values`). The first forward is unchanged.
    """
    from opensci_patch.rewrite.patches import apply_patches, default_patches

    shutil.copytree(FIXTURE_DIR, dst)
    modeling = dst / "modeling_opensci.py"
    source, _ = apply_patches(modeling.read_text(), default_patches(), modeling.name)
    assert source.count(DROP_CACHE_AT) == 1, "the shipped model no longer builds its cache where this fault expects"
    fault = "        past_key_values = None  # injected fault\n"
    modeling.write_text(source.replace(DROP_CACHE_AT, fault + DROP_CACHE_AT))
    return dst


@pytest.fixture(scope="module")
def modeling_source() -> str:
    """The shipped modeling file's source."""
    import patch_sources

    return patch_sources.modeling_source()


@pytest.fixture(scope="module")
def patched_source() -> str:
    """The shipped modeling file with the default patches."""
    import patch_sources

    return patch_sources.patched_source()


@pytest.fixture(scope="module")
def loaded() -> dict:
    """The patched model built, saved, loaded back and probed (once per test process)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import patch_sources

    return patch_sources.loaded_model()


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `opensci-patch` in a child process, as a user would."""
    from opensci_patch._util.procs import child_env

    env = child_env()
    return subprocess.run(
        [sys.executable, "-m", "opensci_patch.cli", *args], text=True, capture_output=True, timeout=timeout, env=env
    )


@pytest.fixture
def cli():
    return run_cli


def edit_config(model: Path, **changes) -> None:
    """Set keys of MODEL's config.json."""
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config, indent=2))


def one_line_exit_2(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Bad input as the CLI promises it: exit 2 and one line "opensci-patch: error: ..." naming each needle, never a
    traceback. Returns the line."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "RecursionError" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("opensci-patch: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def running_placeholder(cell, expected=None):
    """The "running" placeholder earlier versions wrote before a cell started (records still left behind by them
    must load and be reported as never finished)."""
    from opensci_patch.measure import records

    message = "the cell was started but never finished (killed, or still running)"
    return records.error_record(cell, records.RUNNING, "NeverFinished", message, "", expected=expected)
