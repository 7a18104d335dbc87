"""A torch release as a cell coordinate, for real: the pinned torch named as a release (`--torch 2.13.0+cpu`, its
wheel already in the find-links, no download) runs as cells of its own, in an env and torch layer of its own, and
gives the `cpu` build's bits; and a genuinely different torch release whose wheel lies on this disk (no download:
the registry's other releases are ~2.9 GB each) runs beside it, each difference pinned on torch."""

from __future__ import annotations

import json
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


def _second_torch() -> str | None:
    """A torch release other than the pin whose wheel lies on this disk (pip's find-links or a file:// index):
    a genuinely different torch at no download. On this project's machines: 2.14.1 (a CUDA build run on CPU)."""
    from opensci_patch.matrix import torch_links

    for release in ("2.14.1", "2.15.0", "2.12.0", "2.11.0", "2.10.0", "2.9.1", "2.6.0"):
        if release != TORCH_PIN and torch_links.local_torch_wheel(release):
            return release
    return None


def test_a_second_torch_release_runs_as_its_own_cells_and_the_report_pins_each_difference_on_torch(tmp_path, cli):
    """Two transformers releases x two torch releases, bfloat16 sdpa (the panel where torch releases have been seen
    to differ): each cell carries its torch, is judged against 4.48.0 on the same torch, and the torch table
    compares it with the pinned torch's cell; its columns agree with the records themselves."""
    second = _second_torch()
    if second is None:
        pytest.skip("no torch release other than the pin lies on this disk (pip find-links or file:// index)")
    recs, results = tmp_path / "records", tmp_path / "results"
    proc = cli("cell", "--transformers", "4.48.0", "--transformers", "5.25.0", "--torch", "cpu", "--torch", second,
               "--variant", "patched", "--attn", "sdpa", "--dtype", "bfloat16", "--records", str(recs),
               timeout=3000)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "comes from this disk" in proc.stdout or f"reusing env {envs.env_name('4.48.0', second)}" in proc.stdout
    got = {}
    for tf in ("4.48.0", "5.25.0"):
        for torch in ("cpu", second):
            got[tf, torch] = records.load(recs / f"tf{tf}-{torch}-patched-bfloat16-sdpa.json")
            assert got[tf, torch].status == "ok" and got[tf, torch].cell.torch == torch
        assert got[tf, second].environment["torch"].split("+")[0] == second
    rep = cli("report", "--records", str(recs), "--results", str(results))
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
    summary = json.loads((results / "summary.json").read_text())
    rows = {r["transformers"]: r for r in summary["torch_table"]}
    assert sorted(rows) == ["4.48.0", "5.25.0"] and {r["torch"] for r in rows.values()} == {second}
    for tf, row in rows.items():
        this, pinned = got[tf, second], got[tf, "cpu"]
        same = (this.logits_sha256, this.generation.step_logits_sha256) == (
            pinned.logits_sha256, pinned.generation.step_logits_sha256)  # fmt: skip
        assert row["pinned"] == "cpu" and row["bit_identical"] is same
        assert row["greedy_equal"] is (this.generation.ids == pinned.generation.ids)
        if not same:  # the first differing decode step, read off the records' own step hashes
            steps = zip(this.generation.step_logits_sha256, pinned.generation.step_logits_sha256, strict=True)
            assert row["first_step"] == next(i for i, (a, b) in enumerate(steps) if a != b)
    # each cell is judged against 4.48.0 on its own torch: the 5.25.0 cells pass against their own torch's reference
    verdicts = summary["verdicts"]
    assert {verdicts[f"tf{tf}-{t}-patched-bfloat16-sdpa"] for tf in ("4.48.0", "5.25.0") for t in ("cpu", second)} == {
        "pass"}  # fmt: skip
    assert any(f"({second}, cpu, bfloat16, sdpa): transformers 4.48.0" in r for r in summary["references"])
