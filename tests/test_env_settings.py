"""The env root and the environment variables that become paths or requirements (`venv.check_settings`): a bad one
is one line and exit 2 before any work, so no record is left "running", and nothing is made outside the env root."""

from __future__ import annotations

from pathlib import Path

import pytest

from opensci_patch._util.errors import EnvironmentSetupError
from opensci_patch.matrix import venv
from opensci_patch.matrix.envs import ensure_env


def _cell(cli, records: Path):
    return cli("cell", "--transformers", "4.48.0", "--variant", "patched", "--records", str(records), timeout=120)


def _refused(proc, *words: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and all(w in lines[0] for w in words), lines


@pytest.mark.parametrize("pin", ["2.13.0/../../x", "2.13.0-x/../../outside", '2.13.0; sys_platform == "x"', ""])
def test_a_torch_pin_that_is_not_a_release_is_refused_before_any_record(cli, tmp_path, monkeypatch, pin):
    root = tmp_path / "envs"
    (root / "_torch-cpu-2.13.0-x").mkdir(parents=True)  # a pin's '..' would resolve through it
    monkeypatch.setenv("OPENSCI_PATCH_ENV_ROOT", str(root))
    monkeypatch.setenv(venv.PIN_VAR, pin)
    proc = _cell(cli, tmp_path / "rec")
    _refused(proc, venv.PIN_VAR)
    assert not (tmp_path / "rec").exists() or list((tmp_path / "rec").iterdir()) == []  # no "running" record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["envs"]  # nothing made outside the env root
    assert [p.name for p in root.iterdir()] == ["_torch-cpu-2.13.0-x"]  # no lock, no layer, no env


@pytest.mark.parametrize("index", ["--no-index", "not a url", "ftp://x"])
def test_a_torch_index_that_is_not_a_url_is_refused(tmp_path, monkeypatch, index):
    monkeypatch.setenv(venv.TORCH_INDEX_VAR, index)
    with pytest.raises(EnvironmentSetupError, match=venv.TORCH_INDEX_VAR):
        venv.check_settings(tmp_path)


def test_an_env_root_that_cannot_be_made_is_one_line_naming_it_and_the_variable(cli, tmp_path, monkeypatch):
    """The default root under a HOME that cannot hold it (read-only, or not a directory): it was a traceback
    from `mkdir` and a "running" record."""
    home = tmp_path / "home"
    home.write_text("a file, not a directory")
    monkeypatch.delenv("OPENSCI_PATCH_ENV_ROOT", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(home))
    proc = _cell(cli, tmp_path / "rec")
    _refused(proc, str(home / ".cache" / "opensci-patch" / "envs"), "OPENSCI_PATCH_ENV_ROOT")
    assert not (tmp_path / "rec").exists() or list((tmp_path / "rec").iterdir()) == []
    with pytest.raises(EnvironmentSetupError, match="OPENSCI_PATCH_ENV_ROOT"):
        ensure_env("4.48.0", "system", root=home / "envs", log=lambda m: None)
