"""A torch release as a cell coordinate, for real: the pinned torch named as a release (`--torch 2.13.0+cpu`, its
wheel already in the find-links, no download) runs as cells of its own, in an env and torch layer of its own, and
gives the `cpu` build's bits. No other torch release is installed here (each is ~2.9 GB)."""

from __future__ import annotations

import sys

import pytest

from opensci_patch._util.defaults import TORCH_PIN
from opensci_patch.matrix import envs
from opensci_patch.measure import records

pytestmark = [
    pytest.mark.crossversion,
    pytest.mark.skipif(sys.platform == "darwin", reason="macOS torch wheels carry no +cpu label"),
]


def test_the_pin_named_as_a_release_runs_as_its_own_cells_with_the_cpu_builds_bits(tmp_path, cli):
    release = f"{TORCH_PIN}+cpu"
    proc = cli("cell", "--transformers", "4.48.0", "--torch", "cpu", "--torch", release, "--variant", "patched",
               "--records", str(tmp_path), timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    build = records.load(tmp_path / "tf4.48.0-cpu-patched-float32-eager.json")
    named = records.load(tmp_path / f"tf4.48.0-{release}-patched-float32-eager.json")
    assert build.status == named.status == "ok" and named.cell.torch == release
    assert named.environment["torch"] == release
    assert named.logits_sha256 == build.logits_sha256
    assert named.generation.step_logits_sha256 == build.generation.step_logits_sha256
    assert f"env {envs.env_name('4.48.0', release)}" in proc.stdout or envs.env_name("4.48.0", release) in proc.stdout
