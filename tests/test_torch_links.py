"""The shared torch layer (`matrix.torch_links`): one per base interpreter, never deleted under a run using it.

Installs are faked here: no torch is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def fake_layer_installer(monkeypatch) -> list[str]:
    """Installers that make a torch layer in milliseconds: a venv layout and a torch .dist-info in it."""
    import sys

    from opensci_patch._util import procs
    from opensci_patch.matrix import torch_links, venv

    real_python, built = sys.executable, []

    def run_installer(cmd, cwd, name):
        if "venv" in cmd:
            path = Path(cmd[-1])
            venv.site_packages(path).mkdir(parents=True, exist_ok=True)
            venv.venv_python(path).parent.mkdir(parents=True, exist_ok=True)
            venv.venv_python(path).symlink_to(real_python)
            built.append(path.name)
            return
        site = venv.site_packages(Path(cmd[cmd.index("--python") + 1]).parents[1])
        info = site / f"torch-{torch_links.TORCH_PIN}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_links.TORCH_PIN}\n")
        (site / "torch").mkdir()
        (site / "torch" / "__init__.py").write_text("")

    monkeypatch.setattr(procs, "find_uv", lambda: "uv")
    monkeypatch.setattr(procs, "run_installer", run_installer)
    return built


def _as_interpreter(monkeypatch, executable: str, base: str) -> None:
    import sys

    monkeypatch.setattr(sys, "executable", executable)
    monkeypatch.setattr(sys, "_base_executable", base, raising=False)


def test_a_second_interpreter_never_deletes_the_torch_layer_the_first_one_uses(tmp_path, monkeypatch,
                                                                              fake_layer_installer):  # fmt: skip
    from opensci_patch.matrix import torch_links, venv

    root = tmp_path / "envs"
    _as_interpreter(monkeypatch, "/venvs/a/bin/python", "/pythons/one/bin/python3")
    torch_links.ensure_torch_layer("cpu", root, log=lambda m: None)
    (first,) = [p for p in root.glob("_torch-cpu-*") if p.is_dir()]
    in_use = venv.site_packages(first) / "torch" / "__init__.py"  # what the first run's cells import

    _as_interpreter(monkeypatch, "/venvs/b/bin/python", "/pythons/one/bin/python3")  # another venv, same base
    torch_links.ensure_torch_layer("cpu", root, log=lambda m: None)
    assert in_use.exists() and fake_layer_installer == [first.name]  # shared, not rebuilt

    _as_interpreter(monkeypatch, "/venvs/c/bin/python", "/pythons/two/bin/python3")  # another base interpreter
    torch_links.ensure_torch_layer("cpu", root, log=lambda m: None)
    assert in_use.exists()  # its own layer; the first one untouched
    assert len(fake_layer_installer) == 2 and len({*fake_layer_installer}) == 2


def test_a_complete_torch_layer_is_never_deleted_even_when_its_marker_differs(tmp_path, monkeypatch,
                                                                             fake_layer_installer):  # fmt: skip
    import json

    from opensci_patch._util import locations
    from opensci_patch._util.errors import EnvironmentSetupError
    from opensci_patch.matrix import torch_links, venv

    root = tmp_path / "envs"
    torch_links.ensure_torch_layer("cpu", root, log=lambda m: None)
    layer = torch_links.torch_layer_path("cpu", root)
    marker = json.loads((layer / locations.MARKER).read_text())
    (layer / locations.MARKER).write_text(json.dumps({**marker, "torch_pin": "0.0.1"}))
    with pytest.raises(EnvironmentSetupError, match="never deleted"):
        torch_links.ensure_torch_layer("cpu", root, log=lambda m: None)
    assert (venv.site_packages(layer) / "torch" / "__init__.py").exists()

