"""`cell --torch-sweep`: which (transformers, torch) pairs it plans and the downloads it prints before any.
The index and the releases' requirements are faked: nothing is downloaded."""

from __future__ import annotations

import sys

import pytest
from packaging.tags import sys_tags

from opensci_patch import cli
from opensci_patch.matrix import releases, runner, torch_links, torch_sweep

TORCHES = ["1.13.1", "2.0.0", "2.5.1", "2.6.0", "2.13.0", "2.15.0"]
NEEDS = {"4.48.0": "torch>=2.0", "5.25.0": "torch>=2.6"}
HERE = str(next(iter(sys_tags())))  # this interpreter's most specific wheel tag, e.g. cp311-cp311-manylinux_2_28_x86_64


@pytest.fixture
def fake_index(monkeypatch, tmp_path):
    monkeypatch.setattr(torch_sweep, "TORCH_PIN", "2.13.0")
    monkeypatch.setattr(torch_sweep, "index_torches", lambda: list(TORCHES))
    monkeypatch.setattr(torch_sweep, "release_requirement", NEEDS.get)
    monkeypatch.setenv("OPENSCI_PATCH_ENV_ROOT", str(tmp_path / "envs"))  # no built torch layer
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / f"torch-2.13.0+cpu-{HERE}.whl").write_bytes(b"")  # the pin is local
    monkeypatch.setattr(torch_links, "pip_config", lambda: {"find-links": [str(wheels)], "extra-index-url": []})


def test_the_plan_is_the_oldest_supported_the_pin_and_the_newest_per_release(fake_index):
    assert torch_sweep.plan(["4.48.0", "5.25.0"]) == {
        "4.48.0": ["2.0.0", "2.6.0", "2.13.0+cpu", "2.15.0"],  # 2.6.0: the reference of 5.25.0's 2.6.0 cells
        "5.25.0": ["2.6.0", "2.13.0+cpu", "2.15.0"],
    }
    # a release other than the reference gets no torch below its own minimum from another release's plan
    assert torch_sweep.plan(["4.57.6", "5.25.0"], requirement={"4.57.6": "torch>=2.2", **NEEDS}.get)["5.25.0"] == [
        "2.6.0", "2.13.0+cpu", "2.15.0"]  # fmt: skip
    # the newest on the index is the pinned release: the pin stands for it, no second flavour
    assert torch_sweep.plan(["5.25.0"], torches=lambda: ["2.6.0", "2.13.0"]) == {"5.25.0": ["2.6.0", "2.13.0+cpu"]}


def test_the_index_gives_cpu_wheels_where_it_has_them_for_this_python_only(monkeypatch):
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    files = [
        (f"torch-2.0.0-{tag}-{tag}-manylinux1_x86_64.whl", False),
        (f"torch-2.6.0-{tag}-none-macosx_11_0_arm64.whl", False),
        (f"torch-2.6.0+cpu-{tag}-{tag}-manylinux_2_28_x86_64.whl", False),
        (f"torch-2.7.0+cu118-{tag}-{tag}-manylinux_2_28_x86_64.whl", False),
        (f"torch-2.8.0-{tag}-{tag}-manylinux_2_28_x86_64.whl", True),  # yanked
        (f"torch-2.9.0rc1-{tag}-{tag}-manylinux_2_28_x86_64.whl", False),
        ("torch-2.10.0-cp38-cp38-manylinux_2_28_x86_64.whl", False),  # another Python
        ("torch-2.11.0.tar.gz", False),
    ]
    monkeypatch.setattr(releases, "_project_files", lambda url, timeout, project: files)
    assert torch_sweep.index_torches() == ["2.0.0", "2.6.0+cpu"]


def test_cell_torch_sweep_prints_the_downloads_before_running_the_planned_pairs(fake_index, monkeypatch, capsys,
                                                                                tmp_path):  # fmt: skip
    ran = []
    monkeypatch.setattr(runner, "main_cells", lambda cells, *a, **k: ran.append((capsys.readouterr().out, cells)) or 0)
    assert cli.main(["cell", "--torch-sweep", "--variant", "patched", "--records", str(tmp_path / "r")]) == 0
    printed, cells = ran[0]
    assert "3 torch release(s) to download: 2.0.0 (~2.9 GB), 2.6.0 (~2.9 GB), 2.15.0 (~2.9 GB); about 8.7 GB" in printed
    assert sorted((c.transformers, c.torch) for c in cells) == [
        ("4.48.0", "2.0.0"), ("4.48.0", "2.13.0+cpu"), ("4.48.0", "2.15.0"), ("4.48.0", "2.6.0"),
        ("5.25.0", "2.13.0+cpu"), ("5.25.0", "2.15.0"), ("5.25.0", "2.6.0"),
    ]  # fmt: skip


def test_cell_torch_sweep_with_torch_is_refused(capsys, tmp_path):
    assert cli.main(["cell", "--torch-sweep", "--torch", "2.6.0", "--records", str(tmp_path / "r")]) == 2
    assert "drop --torch" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_releases_torch_minimum_is_read_from_its_built_env(tmp_path):
    from opensci_patch._util.locations import MARKER
    from opensci_patch.matrix import venv

    env = tmp_path / "tf4.48.0-2.13.0+cpu-py3.11"
    info = venv.site_packages(env) / "transformers-4.48.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text('Metadata-Version: 2.1\nName: transformers\nVersion: 4.48.0\nRequires-Dist: numpy\n'
                                   'Requires-Dist: torch>=2.0; extra == "torch"\n')  # fmt: skip
    (env / MARKER).write_text("{}")
    assert torch_sweep.release_requirement("4.48.0", tmp_path) == "torch>=2.0"


def test_a_torch_on_a_local_simple_index_counts_as_no_download(monkeypatch, tmp_path):
    """pip's `file://` extra indexes are looked in, as pip does: the project page links to the file; a wheel of
    another release or another platform does not count."""
    files, page = tmp_path / "files", tmp_path / "simple" / "torch"
    files.mkdir()
    page.mkdir(parents=True)
    names = [f"torch-2.14.1-{HERE}.whl", "torch-2.6.0-cp27-cp27m-win32.whl", f"torch-2.5.1-{HERE}.whl"]
    for name in names[:2]:
        (files / name).write_bytes(b"")
    links = "".join(f'<a href="../../files/{n}#sha256=00">{n}</a>' for n in names)  # 2.5.1: listed, no file
    (page / "index.html").write_text(f"<!DOCTYPE html><html><body>{links}</body></html>")
    monkeypatch.setattr(
        torch_links, "pip_config", lambda: {"find-links": [], "extra-index-url": [f"file://{tmp_path}/simple"]}
    )
    monkeypatch.setenv("OPENSCI_PATCH_ENV_ROOT", str(tmp_path / "envs"))
    assert torch_links.local_torch_wheel("2.14.1") == str(files / names[0])
    assert torch_links.local_torch_wheel("2.6.0") is None and torch_links.local_torch_wheel("2.5.1") is None
    assert torch_sweep.downloads({"5.25.0": ["2.5.1", "2.6.0", "2.14.1"]}) == ["2.5.1", "2.6.0"]
