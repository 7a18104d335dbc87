"""demo: the README's main job, and its MATCH / MISMATCH verdict against the shipped 4.48.0 record."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
from conftest import FIXTURE_DIR

from opensci_patch import demo
from opensci_patch.measure import records
from opensci_patch.measure.records import load


@pytest.fixture(scope="module")
def reference():
    return load(demo.REFERENCE_RECORD)


def test_the_shipped_reference_is_a_passing_448_record(reference):
    assert reference.environment["transformers"] == "4.48.0"
    assert reference.status == "ok" and reference.generation.kv_check.ok
    assert reference.settings["dtype"] == "float32" and reference.settings["attn"] == "eager"
    assert reference.target.token == " Paris" and reference.target.rank == 1
    assert reference.reference.max_abs_diff < 1e-4  # the independent fp64 forward agrees


def test_identical_capture_matches_bit_for_bit(reference):
    match, line = demo.compare(copy.deepcopy(reference), reference)
    assert match and line.startswith("MATCH") and "bit-identical" in line


def test_rounding_within_tolerance_matches_but_says_not_bit_identical(reference):
    other = copy.deepcopy(reference)
    other.logits_sha256 = "0" * 64
    other.topk = (replace(other.topk[0], logit=other.topk[0].logit + 2e-5), *other.topk[1:])
    match, line = demo.compare(other, reference)
    assert match and "not bit-identical" in line


@pytest.mark.parametrize(
    "damage",
    ["token", "logit", "order", "status"],
)
def test_what_counts_as_a_mismatch(reference, damage):
    other = copy.deepcopy(reference)
    if damage == "token":
        ids = list(other.generation.ids)
        ids[1] += 1  # wrong from the second token on: the 5.24 failure
        other.generation = replace(other.generation, ids=tuple(ids))
    elif damage == "logit":
        top = list(other.topk)
        top[3] = replace(top[3], logit=top[3].logit + 1e-2)
        other.topk = tuple(top)
    elif damage == "order":
        other.topk = (other.topk[1], other.topk[0], *other.topk[2:])
    else:
        other.status = records.Status.GENERATE_MISMATCH
        other.error = records.ErrorInfo("KVCacheMismatch", "decode step 1: ...", "")
    match, line = demo.compare(other, reference)
    assert not match and line.startswith("MISMATCH")


def test_demo_matches_on_the_installed_release(cli, tmp_path):
    proc = cli("demo", "--workdir", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| original | load-error" in proc.stdout
    assert "MATCH with the transformers 4.48.0 reference" in proc.stdout


def test_a_capture_whose_decoding_is_broken_is_a_mismatch(cli, tmp_path):
    """What the demo's verdict says of a patched model that drops its KV cache (the 5.24 failure)."""
    from conftest import cache_dropping_copy

    broken = cache_dropping_copy(tmp_path / "broken")
    rec = tmp_path / "broken.json"
    proc = cli("capture", str(broken), "--out", str(rec), "--quiet")
    assert proc.returncode == 1
    match, line = demo.compare(load(rec), load(demo.REFERENCE_RECORD))
    assert not match and "MISMATCH" in line and "generate-mismatch" in line


@pytest.mark.crossversion
def test_the_shipped_reference_is_what_448_gives_today(tmp_path, reference):
    from test_crossversion import capture

    from opensci_patch.rewrite.hotfix import hotfix

    fixed = tmp_path / "opensci-tiny_fixed"
    hotfix(FIXTURE_DIR, fixed, log=lambda *a: None)
    _, fresh = capture("4.48.0", fixed, tmp_path / "r.json")
    # What the demo promises (verdict.same_tokens_within): the same 20 tokens and top-10, logits within 1e-4.
    # Not bit identity: the record was made on another CPU, and an AMD EPYC here rounds the same 4.48.0 forward
    # differently (logits_sha256 2c578f.. vs e5aa2d.., from this tree and from the tree before issue 18 alike).
    match, line = demo.compare(load(tmp_path / "r.json"), reference)
    assert match, line
    assert tuple(fresh["generation"]["ids"]) == reference.generation.ids


def test_the_demo_says_when_the_index_has_a_newer_release_and_what_to_run(tmp_path, monkeypatch):
    from importlib import metadata

    from packaging.version import Version

    from opensci_patch.matrix import overrides, releases

    installed = Version(metadata.version("transformers"))
    newer = Version(f"{installed.major}.{installed.minor + 1}.0")
    lines = demo.newer_release_note(fetch=lambda: [installed, newer, Version(f"{newer}rc1")])
    assert len(lines) == 2
    assert f"transformers {newer}, newer than the installed {installed}" in lines[0]
    assert lines[1].endswith(f"opensci-patch cell --transformers 4.48.0 --transformers {newer} && opensci-patch report")
    assert demo.newer_release_note(fetch=lambda: [installed]) == []
    # the overrides file is named only where it lifts a pin of that release
    lifting = tmp_path / "overrides.txt"
    lifting.write_text(f"=={newer}: kernels>=0.17\n")
    monkeypatch.setattr(overrides, "COMMITTED", lifting)
    lines = demo.newer_release_note(fetch=lambda: [installed, newer])
    assert f"--transformers {newer} --overrides {lifting} && opensci-patch report" in lines[1]

    def offline():
        raise releases.IndexUnreachable("cannot read the index")

    assert demo.newer_release_note(fetch=offline) == []
