"""diagnose: name the first stage where two cells disagree, and the likely cause.

The cross-version tests run real releases in their per-release envs (like test_crossversion.py);
each diagnose run belongs to exactly one test, so pytest-xdist never runs one twice. The
broken test models are the patched or structural fixture with one deliberate change each.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE_DIR, REPO, structural_copy

from opensci_patch import diagnose as dg
from opensci_patch._util.errors import OpensciPatchError
from opensci_patch.diagnose import checks as dgchecks
from opensci_patch.diagnose.compare import side_verdict, split_positions
from opensci_patch.matrix.envs import ensure_env
from opensci_patch.matrix.spec import Cell
from opensci_patch.rewrite.hotfix import hotfix

ROPE_STAGES = {"rope.cos", "rope.sin", "q_rope", "k_rope"}

INTERLEAVED_ROPE = '''def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Deliberately wrong (test model): rotates interleaved pairs (0, 1), (2, 3), ... of the rotary channels."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]
    c, s = cos[..., : rotary_dim // 2], sin[..., : rotary_dim // 2]

    def rotate(x):
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
        return torch.cat((out, x_pass), dim=-1)

    return rotate(q), rotate(k)'''


def expected_inv_freq(model_dir: Path = FIXTURE_DIR) -> torch.Tensor:
    """1 / theta^(2i/d) for d = head_dim * partial_rotary_factor, from the config, in fp64."""
    cfg = json.loads((model_dir / "config.json").read_text())
    dim = int(cfg["head_dim"] * cfg.get("partial_rotary_factor", 1.0))
    return 1.0 / (cfg["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def checks(result: dict, name: str) -> dict[str | None, dict]:
    return {c["side"]: c for c in result["checks"] if c["name"] == name}


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"test model: {old!r} not found exactly once"
    return text.replace(old, new)


# ---------------------------------------------------------------------------------------------
# fast: no per-release envs


def test_driver_module_imports_no_torch_or_transformers():
    """The driver runs where torch/transformers may be missing: its imports are stdlib-only."""
    code = (
        "import sys, opensci_patch.diagnose, opensci_patch.diagnose.driver, opensci_patch.diagnose.cells, "
        "opensci_patch.diagnose.checks; "
        "print(sorted({'torch', 'transformers', 'libcst'} & set(sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("5.2.0", Cell("5.2.0", "cpu", "patched")),
        ("5.2.0:structural", Cell("5.2.0", "cpu", "structural")),
        ("4.57.6:bfloat16:patched+init:sdpa:system", Cell("4.57.6", "system", "patched+init", "bfloat16", "sdpa")),
        ("tf5.0.0-system-original-float32-eager", Cell("5.0.0", "system", "original")),
    ],
)
def test_parse_cell_reads_short_specs_and_matrix_ids(spec, expected):
    assert Cell.parse(spec) == expected


@pytest.mark.parametrize("spec", ["5.2.0:structual", "5.2.0:float8", "tf5.2.0-cpu-nosuch-float32-eager"])
def test_parse_cell_names_the_bad_field(spec):
    with pytest.raises(OpensciPatchError, match="cell|variant"):
        Cell.parse(spec)


def test_threshold_is_relative_and_dtype_aware():
    assert dg.threshold("float32", "float32", 0.0) == pytest.approx(1e-4)
    assert dg.threshold("float32", "float32", 15.0) == pytest.approx(1.6e-3)
    assert dg.threshold("float32", "bfloat16", 15.0) == pytest.approx(0.8)  # the looser side wins


def _row(a_ref: float, b_ref: float, dtypes: tuple[str, str] = ("float32", "float32"), ref_max: float = 4.0) -> dict:
    return {
        "key": "layer 1 k_norm",
        "a_ref": a_ref,
        "b_ref": b_ref,
        "ref_max": ref_max,
        "threshold_a": dg.threshold(dtypes[0], dtypes[0], ref_max),
        "threshold_b": dg.threshold(dtypes[1], dtypes[1], ref_max),
    }


@pytest.mark.parametrize(
    ("row", "wrong", "says"),
    [
        (_row(3e-7, 2.0), "B", "B is wrong: 2.00e+00 from reference, A 3.00e-07"),
        (_row(3e-7, 4e-7), None, "rounding noise"),
        (_row(1.5, 2.0), "both", "both sides differ"),
        (_row(3e-7, 8e-2, ("float32", "bfloat16")), None, "rounding noise"),  # bf16 rounding is no bug
        (_row(1e-3, 8e-2, ("float32", "bfloat16")), "A", "A is wrong"),  # but fp32 this far off is
    ],
    ids=["bug", "noise", "both", "bf16-noise", "fp32-off-next-to-bf16"],
)
def test_fp64_noise_test_tells_rounding_from_bugs(row, wrong, says):
    verdict = side_verdict(row, ("A", "B"))
    assert verdict["wrong"] == wrong
    assert says in verdict["text"]


def test_split_keeps_position_zero_apart():
    diff = torch.zeros(1, 4, 5, 8)  # (batch, heads, seq, head_dim): seq axis 2
    diff[0, 1, 3, 2] = -2.0
    pos0, rest, per = split_positions(diff, 2)
    assert (pos0, rest) == (0.0, 2.0)
    assert per == [0.0, 0.0, 0.0, 2.0, 0.0]
    diff[0, 0, 2, 0] = math.nan
    assert math.isnan(split_positions(diff, 2)[1])  # NaN is a divergence, never silently dropped


def _rotary(values: torch.Tensor) -> dict:
    return {
        "after_call": {
            "dtype": str(values.dtype).removeprefix("torch."),
            "shape": list(values.shape),
            "all_zero": not bool(values.ne(0).any()),
            "values": values.double().tolist(),
        }
    }


@pytest.mark.parametrize(
    ("values", "fires", "evidence"),
    [
        (expected_inv_freq().float(), False, "matches"),
        (torch.zeros(12), True, "inv_freq all zero in B"),
        (expected_inv_freq().float() * torch.tensor([1.0] * 11 + [1e30]), True, "inv_freq holds garbage in B"),
        (torch.full((12,), math.nan), True, "non-finite"),
        (expected_inv_freq()[:6].float(), True, "6 entries"),
    ],
    ids=["right", "zeros", "garbage", "nan", "wrong-length"],
)
def test_inv_freq_check_compares_with_recomputed_values(values, fires, evidence):
    buffers = [{"name": "model.rotary_emb.inv_freq", "persistent": False}]
    cfg = json.loads((FIXTURE_DIR / "config.json").read_text())
    values_check, dtype_check = dgchecks.inv_freq_checks("B", _rotary(values), buffers, cfg)
    assert values_check["fired"] is fires
    assert evidence in values_check["evidence"]
    assert dtype_check["fired"] is False


def test_inv_freq_dtype_check_fires_for_bf16_only():
    buffers = [{"name": "model.rotary_emb.inv_freq", "persistent": False}]
    cfg = json.loads((FIXTURE_DIR / "config.json").read_text())
    bf16 = dgchecks.inv_freq_checks("B", _rotary(expected_inv_freq().bfloat16()), buffers, cfg)
    f32 = dgchecks.inv_freq_checks("A", _rotary(expected_inv_freq().float()), buffers, cfg)
    assert [c["fired"] for c in bf16] == [False, True]  # right to bf16 precision, but downcast
    assert "bfloat16" in bf16[1]["evidence"]
    assert [c["fired"] for c in f32] == [False, False]


# ---------------------------------------------------------------------------------------------
# cross-version: real releases in their envs


@pytest.fixture(scope="module")
def test_models(tmp_path_factory) -> dict[str, Path]:
    """Deliberately broken variants of the fixture, each next to its correct twin."""
    root = tmp_path_factory.mktemp("diagnose-models")
    out: dict[str, Path] = {}
    # (c) partial rotary (12 of 24 channels) on the patched code; the broken twin pairs interleaved channels
    out["partial"] = root / "partial"
    hotfix(FIXTURE_DIR, out["partial"], log=lambda *a: None)
    cfg = json.loads((out["partial"] / "config.json").read_text())
    cfg["partial_rotary_factor"] = 0.5
    (out["partial"] / "config.json").write_text(json.dumps(cfg, indent=2))
    out["partial-interleaved"] = root / "partial-interleaved"
    shutil.copytree(out["partial"], out["partial-interleaved"])
    modeling = out["partial-interleaved"] / "modeling_opensci.py"
    source, n = re.subn(
        r"def apply_rotary_pos_emb\(.*?(?=\n\n\n)", INTERLEAVED_ROPE, modeling.read_text(), count=1, flags=re.S
    )
    assert n == 1
    modeling.write_text(source)
    # (d) structural fixes only (runs right on 4.x); the twin stores inv_freq in bfloat16
    out["structural"] = structural_copy(root / "structural")
    out["structural-bf16"] = root / "structural-bf16"
    shutil.copytree(out["structural"], out["structural-bf16"])
    modeling = out["structural-bf16"] / "modeling_opensci.py"
    modeling.write_text(
        replace_once(
            modeling.read_text(),
            'self.register_buffer("inv_freq", inv_freq, persistent=False)',
            'self.register_buffer("inv_freq", inv_freq.to(torch.bfloat16), persistent=False)',
        )
    )
    # (e) an SDPA path that computes something else than the eager path (wrong scale)
    out["sdpa-broken"] = root / "sdpa-broken"
    hotfix(FIXTURE_DIR, out["sdpa-broken"], log=lambda *a: None)
    modeling = out["sdpa-broken"] / "modeling_opensci.py"
    modeling.write_text(replace_once(modeling.read_text(), "scale=scaling,", "scale=scaling * 0.5,"))
    return out


def side(label: str, version: str, model: Path, **kw) -> dg.Side:
    env = ensure_env(version, "system", log=lambda *a: None)
    return dg.Side(label, env.python, model, f"transformers {version}, {model.name}", **kw)


@pytest.mark.crossversion
def test_structural_fixes_alone_diverge_at_rope_after_position_zero_on_5x(tmp_path):
    """(a) 4.57.6 vs 5.2.0, structural fixes only: RoPE is the first stage that differs, never at position 0."""
    lines: list[str] = []
    result = dg.diagnose(
        Cell("4.57.6", "system", "structural"),
        Cell("5.2.0", "system", "structural"),
        None,
        tmp_path / "diag",
        log=lines.append,
    )
    print("\n".join(lines))
    assert result["status"] == "diverged" and result["diverged"] is True
    first = result["first_divergence"]
    assert first["stage"] in ROPE_STAGES, first["key"]
    # Position 0 rotates by inv_freq * 0 = 0, unless the uninitialised memory happens to hold inf/NaN.
    b_seen = json.loads((tmp_path / "diag" / "probe-B" / "buffers.json").read_text())["rotary"]["after_call"]
    b_finite = bool(torch.isfinite(torch.tensor(b_seen["values"], dtype=torch.float64)).all())
    if b_finite:
        assert first["where"] == "positions > 0 only"
        assert first["ab_pos0"] <= first["threshold"] < first["ab_rest"]
    assert not first["ab_rest"] <= first["threshold"]
    assert first["a_ref"] < first["threshold"] and not first["b_ref"] <= first["threshold"]  # fp64 blames 5.2
    assert result["first_divergence_verdict"]["wrong"] == "B"
    # the check fires for 5.2 only; confirm its premise independently against the recomputed values
    inv = checks(result, "inv_freq_values")
    assert inv["B"]["fired"] and not inv["A"]["fired"]
    assert re.search(r"inv_freq (all zero|holds garbage|holds non-finite values) in B", inv["B"]["evidence"])
    expected = expected_inv_freq()
    for label, should_match in (("A", True), ("B", False)):
        seen = json.loads((tmp_path / "diag" / f"probe-{label}" / "buffers.json").read_text())["rotary"]
        values = torch.tensor(seen["after_call"]["values"], dtype=torch.float64)
        assert torch.allclose(values, expected, rtol=1e-6, atol=0) is should_match
    assert "inv_freq" in result["verdict"] and result["verdict"].startswith("B is wrong")
    assert not checks(result, "rope_pairing")["B"]["fired"]  # the rotation itself is right: only its table is not
    report = "\n".join(lines)
    if b_finite:
        assert f"first divergence: {first['key']}, at positions > 0 only (position 0 agrees)" in report
    assert json.loads((tmp_path / "diag" / "diagnose.json").read_text())["first_divergence"]["key"] == first["key"]
    assert not (tmp_path / "diag" / "models").exists()  # the hotfixed copies are removed


@pytest.mark.crossversion
def test_patched_cells_agree_at_every_stage_across_releases(tmp_path):
    """(b) 4.57.6 vs 5.2.0, both patched: no divergence, both on the fp64 reference, no check fires."""
    result = dg.diagnose(
        Cell("4.57.6", "system", "patched"),
        Cell("5.2.0", "system", "patched"),
        None,
        tmp_path / "diag",
        log=lambda *a: None,
    )
    assert result["status"] == "agree" and result["diverged"] is False
    assert result["first_divergence"] is None
    # the forward agrees, so the decode loop is compared too: same tokens and logits, each side equal to its
    # own no-cache recomputation (4.57.6 and 5.2.0 both pass the cache as past_key_values)
    decode = result["decode"]
    assert decode["status"] == "agree" and decode["first_step"] is None and decode["first_token"] is None
    assert decode["steps"] == dg.DEFAULT_DECODE_STEPS
    assert all(s["first_bad_step"] is None for s in decode["sides"].values()) and not decode["findings"]
    assert len(result["stages"]) == 3 + 3 * len(dg.LAYER_STAGES) + 2 and not result["missing_stages"]
    assert [c for c in result["checks"] if c["fired"]] == []
    assert all(r["ab_pos0"] <= r["threshold"] and r["ab_rest"] <= r["threshold"] for r in result["stages"])


@pytest.mark.crossversion
def test_interleaved_partial_rotary_is_caught_by_the_pairing_check(test_models, tmp_path):
    """(c) rotary dim 12 of 24, pairs (0,1),(2,3)... instead of half-split: first divergence q_rope, pairing named."""
    result = dg.compare_sides(
        side("A", "5.2.0", test_models["partial"]),
        side("B", "5.2.0", test_models["partial-interleaved"]),
        tmp_path / "diag",
        log=lambda *a: None,
    )
    first = result["first_divergence"]
    assert (first["stage"], first["layer"], first["where"]) == ("q_rope", 0, "positions > 0 only")
    pairing = checks(result, "rope_pairing")
    assert not pairing["A"]["fired"]
    assert pairing["B"]["fired"] and (pairing["B"]["pairing"], pairing["B"]["span"]) == ("interleaved", "first")
    assert "RoPE pairs interleaved channels" in pairing["B"]["evidence"]
    assert "transformers uses half-split" in pairing["B"]["evidence"]
    assert not any(c["fired"] for c in checks(result, "inv_freq_values").values())  # the table is right
    assert result["first_divergence_verdict"]["wrong"] == "B" and "interleaved" in result["verdict"]


@pytest.mark.crossversion
def test_bf16_inv_freq_is_caught_by_the_downcast_check(test_models, tmp_path):
    """(d) inv_freq stored in bfloat16 (4.57.6 keeps the __init__ values): angles drift at positions > 0."""
    result = dg.compare_sides(
        side("A", "4.57.6", test_models["structural"]),
        side("B", "4.57.6", test_models["structural-bf16"]),
        tmp_path / "diag",
        log=lambda *a: None,
    )
    first = result["first_divergence"]
    assert first["stage"] in ROPE_STAGES and first["where"] == "positions > 0 only"
    dtype = checks(result, "inv_freq_dtype")
    assert dtype["B"]["fired"] and "bfloat16" in dtype["B"]["evidence"]
    assert not dtype["A"]["fired"]
    assert not checks(result, "inv_freq_values")["B"]["fired"]  # the right values, to bf16 precision
    assert "downcast" in result["verdict"]


@pytest.mark.crossversion
def test_sdpa_only_divergence_is_blamed_on_the_attention_kernel(test_models, tmp_path):
    """First divergence at attn_out with SDPA on one side: rerun both eager, the divergence disappears."""
    result = dg.compare_sides(
        side("A", "5.2.0", test_models["sdpa-broken"], attn="sdpa"),
        side("B", "5.2.0", test_models["sdpa-broken"]),
        tmp_path / "diag",
        log=lambda *a: None,
    )
    first = result["first_divergence"]
    assert (first["stage"], first["layer"]) == ("attn_out", 0)
    kernel = checks(result, "attention_kernel")[None]
    assert kernel["fired"] and "disappears" in kernel["evidence"]
    assert "attention kernel" in result["verdict"]
