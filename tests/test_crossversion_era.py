"""Own 4.3x-era remote-code files (`rotary_era`) on 4.48.0 and 5.3.0 (issue 29).

- Their rotary classes compute `inv_freq` from `base`/`dim` in `__init__` (one with non-persistent `cos_cached`/
  `sin_cached`, one StableLM-like with LayerNorm and 25% rotary): 5.x leaves those buffers uninitialised after its
  meta-device load, so the originals give non-finite or different logits there; hotfixed (`inv_freq_guard` re-runs
  the class's own `__init__` on CPU) they give 4.48.0's logits, decode steps and 20 greedy ids, bit for bit.
- `cell --require einops` runs a file that imports einops (fused `qkv_proj`: the fp64 reference records itself
  as not applicable, and the cell keeps its own result); without it the file cannot load. `diagnose` on such a
  model skips the reference as not applicable instead of crashing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import rotary_era
from conftest import run_cli
from research_checkpoint import capture_on, same_numerics

from opensci_patch.rewrite.hotfix import hotfix

pytestmark = pytest.mark.crossversion

NATIVE, NEWER = "4.48.0", "5.3.0"


@pytest.fixture(scope="module")
def era(tmp_path_factory) -> dict[tuple[str, str], dict]:
    """(kind, original|patched) -> {release: record}."""
    root = tmp_path_factory.mktemp("era")
    out: dict[tuple[str, str], dict] = {}
    for kind in ("cached", "partial"):
        original = rotary_era.build(root / kind, kind)
        patched = hotfix(original, log=lambda *a: None).dst
        for variant, model in (("original", original), ("patched", patched)):
            out[kind, variant] = {v: capture_on(v, model, root / f"{kind}-{variant}-{v}.json") for v in (NATIVE, NEWER)}
    return out


@pytest.mark.parametrize("kind", ["cached", "partial"])
def test_the_original_runs_on_448_and_breaks_on_5x(era, kind):
    on = era[kind, "original"]
    assert on[NATIVE]["status"] == "ok"
    broken = on[NEWER]["status"] == "nonfinite-logits" or on[NEWER]["logits_sha256"] != on[NATIVE]["logits_sha256"]
    assert broken, on[NEWER]["status"]


@pytest.mark.parametrize("kind", ["cached", "partial"])
def test_hotfixed_it_gives_448s_numbers_on_5x(era, kind):
    patched, original = era[kind, "patched"], era[kind, "original"]
    assert same_numerics(patched[NEWER], patched[NATIVE])
    assert same_numerics(patched[NATIVE], original[NATIVE])  # on its own release the patch changes nothing
    assert len(patched[NEWER]["generation"]["ids"]) == 20


def _cell(model: Path, records: Path, *extra: str) -> dict:
    proc = run_cli("cell", "--transformers", NATIVE, "--model", str(model), "--variant", "original",
                   "--records", str(records), *extra, timeout=600)  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    (path,) = records.glob("*.json")
    return json.loads(path.read_text())


def test_cell_require_einops_runs_a_file_importing_einops(tmp_path):
    model = rotary_era.build(tmp_path / "fused", "cached", fused=True, einops=True)
    without = _cell(model, tmp_path / "without")
    assert without["status"] == "load-error" and "einops" in without["error"]["message"]
    rec = _cell(model, tmp_path / "with", "--require", "einops")
    assert rec["status"] == "ok", rec.get("error")
    assert rec["environment"]["extra_requirements"] == ["einops"]
    assert rec["reference"]["not_applicable"].startswith("not applicable: no weight")  # fused qkv_proj
    off = _cell(model, tmp_path / "off", "--require", "einops", "--reference", "off")
    assert off["status"] == "ok" and off["reference"] is None and off["logits_sha256"] == rec["logits_sha256"]


def test_diagnose_skips_the_reference_as_not_applicable_on_a_fused_qkv_model(tmp_path):
    from opensci_patch import diagnose as dg
    from opensci_patch.matrix.envs import ensure_env

    model = rotary_era.build(tmp_path / "fused", "cached", fused=True)
    env = ensure_env(NATIVE, "system", log=lambda *a: None)
    sides = [dg.Side(label, env.python, model, f"transformers {NATIVE}, fused") for label in "AB"]
    result = dg.compare_sides(*sides, tmp_path / "diag", log=lambda *a: None)
    assert result["reference"].startswith("off (not applicable: no weight")
    assert result["first_divergence"] is None  # the two sides still compared, stage by stage
