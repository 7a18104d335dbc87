"""Capture on real transformers releases, each in its own environment.

The claim under test: the original open-sci code fails on every release (each for its
own reason), the hotfixed code loads everywhere and gives bit-identical fp32 eager
logits, and the structural fixes alone are not enough on 5.x (RoPE is broken).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import FIXTURE_DIR, structural_copy

from opensci_patch.matrix.envs import ensure_env, run_python
from opensci_patch.rewrite.hotfix import hotfix
from opensci_patch.rewrite.patches import default_patches

pytestmark = pytest.mark.crossversion

VERSIONS = ["4.48.0", "4.57.6", "5.2.0"]
# Each original failure is the one the breakage list predicts for that release.
ORIGINAL_FAILURE = {
    "4.48.0": "TransformersKwargs",  # added in 4.54
    "4.57.6": "LossKwargs",  # removed in 4.54
    "5.2.0": "LossKwargs",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    orig = root / "opensci-tiny"
    shutil.copytree(FIXTURE_DIR, orig)
    out = {"original": orig, "patched": root / "opensci-tiny_fixed"}
    hotfix(orig, out["patched"], log=lambda *a: None)
    # Only the three structural fixes, as a naive user would do: loads on 5.x, RoPE still broken.
    out["structural"] = structural_copy(root / "opensci-tiny_structural")
    return out


def capture(version: str, model: Path, out: Path, *extra: str) -> tuple[int, dict]:
    env = ensure_env(version, "system", log=lambda *a: None)
    proc = run_python(
        env, ["-m", "opensci_patch.cli", "capture", str(model), "--out", str(out), "--quiet", *extra], timeout=600
    )
    assert proc.returncode in (0, 1), proc.stderr
    record = json.loads(out.read_text())
    assert record["environment"]["transformers"] == version
    return proc.returncode, record


@pytest.fixture(scope="module")
def records(models, tmp_path_factory) -> dict[tuple[str, str], tuple[int, dict]]:
    out = tmp_path_factory.mktemp("records")
    result = {}
    for v in VERSIONS:
        for kind in ("original", "patched"):
            result[v, kind] = capture(v, models[kind], out / f"{v}-{kind}.json")
    return result


@pytest.mark.parametrize("version", VERSIONS)
def test_original_fails_to_load_as_predicted(records, version):
    rc, rec = records[version, "original"]
    assert rc == 1
    assert rec["status"] == "load-error"
    assert rec["error"]["type"] == "ImportError"
    assert ORIGINAL_FAILURE[version] in rec["error"]["message"]


@pytest.mark.parametrize("version", VERSIONS)
def test_patched_predicts_paris(records, version):
    rc, rec = records[version, "patched"]
    assert rc == 0, rec.get("error")
    assert rec["model"]["patched"] is True
    assert rec["target"]["rank"] == 1
    assert rec["generation"]["text"].startswith(" Paris")


@pytest.mark.parametrize("version", VERSIONS)
def test_patched_agrees_with_fp64_reference(records, version):
    _, rec = records[version, "patched"]
    assert rec["reference"]["max_abs_diff"] < 5e-5


def test_patched_logits_bit_identical_across_releases(records):
    recs = [records[v, "patched"][1] for v in VERSIONS]
    first = recs[0]
    for rec in recs[1:]:
        assert rec["input_ids"] == first["input_ids"]
        assert rec["target"]["logit"] == first["target"]["logit"]
        assert rec["topk"] == first["topk"]
        assert rec["logits_sha256"] == first["logits_sha256"]
        assert rec["generation"]["ids"] == first["generation"]["ids"]


def test_dtype_keyword_probe_follows_the_release(records):
    assert records["4.48.0", "patched"][1]["environment"]["probes"]["dtype_keyword"] == "torch_dtype"
    assert records["5.2.0", "patched"][1]["environment"]["probes"]["dtype_keyword"] == "dtype"


def test_original_with_runtime_shim_loads_on_448_and_matches_patched(models, records, tmp_path):
    rc, rec = capture("4.48.0", models["original"], tmp_path / "shim.json", "--shim")
    assert rc == 0, rec.get("error")
    assert rec["environment"]["shim_installed"] is True
    assert rec["logits_sha256"] == records["4.48.0", "patched"][1]["logits_sha256"]


def test_structural_fixes_alone_leave_rope_broken_on_5x(models, records, tmp_path):
    """Fixture fidelity: loads on 5.2 after the three structural fixes, but diverges."""
    rc, rec = capture("5.2.0", models["structural"], tmp_path / "structural.json")
    assert rec["status"] != "load-error", rec.get("error")
    good = records["5.2.0", "patched"][1]
    assert rec["logits_sha256"] != good["logits_sha256"]
    # Garbage inv_freq can make the logits NaN; NaN is as divergent as a large gap.
    assert not rec["reference"]["max_abs_diff"] <= 1e-3


INV_FREQ_PROBE = """
import json, sys, torch
from opensci_patch.measure.isolation import isolated_hf_cache
with isolated_hf_cache():
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    cfg = m.config
    dim = int(cfg.head_dim * getattr(cfg, "partial_rotary_factor", 1.0))
    expected = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    print(json.dumps({"equal": bool(torch.equal(m.model.rotary_emb.inv_freq, expected)),
                      "max_abs_diff": float((m.model.rotary_emb.inv_freq - expected).abs().max())}))
"""


@pytest.mark.parametrize(("kind", "expect_equal"), [("structural", False), ("patched", True)])
def test_inv_freq_after_load_on_5x(models, kind, expect_equal):
    """The buffer right after from_pretrained, compared with the recomputed frequencies."""
    env = ensure_env("5.2.0", "system", log=lambda *a: None)
    proc = run_python(env, ["-c", INV_FREQ_PROBE, str(models[kind])], timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["equal"] is expect_equal, result


# --- a modular-generated model file (what the real checkpoints ship), built from the 4.54.0 wheel --------

GENERATED_VERSIONS = ["4.48.0", "4.57.6", "5.2.0", "5.23.0"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict:
    from opensci_patch.fixtures.generated import ensure_generated

    root = tmp_path_factory.mktemp("generated")
    source = ensure_generated(log=lambda *a: None)  # cached with the envs, as the matrix uses it
    result = hotfix(source, root / "opensci-generated_fixed", log=lambda *a: None)
    return {"original": source, "patched": result.dst, "summary": result.summary}


def test_generated_file_needs_every_default_patch(generated):
    # rope_theta targets 4.4x-era files that read `config.rope_theta` of a library config; this one reads none,
    # writes Union[...], imports absolutely, none of issue 29's 4.3x constructs and calls post_init already
    # (remote_code applies: its own config class comes `from .configuration_opensci`)
    absent = ("rope_theta", "union_annotations", "relative_imports", "legacy_cache", "generation_call",
              "config_aliases", "rope_scaling", "generation_defaults")  # fmt: skip
    assert generated["summary"] == {
        p.name: "not-applicable" if p.name in absent else "already-applied" if p.name == "post_init" else "applied"
        for p in default_patches()
    }


def test_generated_checkpoint_is_built_once_and_reused(generated, monkeypatch):
    import subprocess

    from opensci_patch.fixtures.generated import ensure_generated

    def no_fetch(*args, **kwargs):
        raise AssertionError(f"fetched again: {args}")

    monkeypatch.setattr(subprocess, "run", no_fetch)
    again = ensure_generated(log=lambda *a: None)
    assert again == generated["original"]
    assert "from transformers.masking_utils import" in (again / "modeling_opensci.py").read_text()


@pytest.mark.parametrize("version", GENERATED_VERSIONS)
def test_generated_file_gives_the_shipped_models_logits(generated, records, version, tmp_path):
    """Same weights, other code: bit-identical to the shipped model on 4.48.0.

    4.48 needs moved_helpers' stand-ins, config_class and tied_weights' accessors; 5.2 the
    check_model_inputs fallback; 5.23 the mask keyword adapter."""
    rc, rec = capture(version, generated["patched"], tmp_path / "generated.json")
    assert rc == 0, rec.get("error")
    shipped = records["4.48.0", "patched"][1]
    assert rec["logits_sha256"] == shipped["logits_sha256"]
    assert rec["generation"]["ids"] == shipped["generation"]["ids"]


@pytest.mark.parametrize("version", ["4.48.0", "5.2.0"])
def test_generated_file_unpatched_fails_to_load(generated, version, tmp_path):
    rc, rec = capture(version, generated["original"], tmp_path / "generated-original.json")
    assert rc == 1 and rec["status"] == "load-error" and rec["error"]["type"] == "ImportError"


def test_a_file_generated_from_4_57_code_gives_the_shipped_logits_on_4_48(records, tmp_path):
    """Later snapshots call DynamicCache(config=...), which 4.48 rejects: moved_helpers' cache shim."""
    from opensci_patch.fixtures.generated import build
    from opensci_patch.matrix.envs import _site_packages

    qwen3 = _site_packages(ensure_env("4.57.6", "system", log=lambda *a: None).path) / "transformers/models/qwen3"
    source = build(tmp_path / "generated-4.57", qwen3)
    assert "DynamicCache(config=self.config)" in (source / "modeling_opensci.py").read_text()
    fixed = hotfix(source, tmp_path / "generated-4.57_fixed", log=lambda *a: None).dst
    rc, rec = capture("4.48.0", fixed, tmp_path / "generated-4.57.json")
    assert rc == 0, rec.get("error")
    assert rec["logits_sha256"] == records["4.48.0", "patched"][1]["logits_sha256"]
