"""The independent plain-torch reference forward pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from opensci_patch.measure import reference


def _prompt_ids(model_dir: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids


def test_reference_predicts_paris_on_the_shipped_checkpoint(model_dir: Path):
    cfg = reference.read_config(model_dir)
    ids = torch.tensor([_prompt_ids(model_dir, "The capital of France is")])
    logits = reference.forward(reference.load_params(model_dir), cfg, ids)[0, -1]
    assert logits.dtype == torch.float64
    assert int(logits.argmax()) == _prompt_ids(model_dir, " Paris")[0]


def test_rope_is_identity_at_position_zero_only(model_dir: Path):
    cfg = reference.read_config(model_dir)
    seen: dict[str, torch.Tensor] = {}

    def hook(stage, layer, t):
        if layer == 0 and stage in ("q_norm", "q_rope"):
            seen[stage] = t

    reference.forward(reference.load_params(model_dir), cfg, torch.tensor([[5, 6, 7, 8]]), hook=hook)
    assert torch.equal(seen["q_norm"][:, :, 0], seen["q_rope"][:, :, 0])
    assert not torch.allclose(seen["q_norm"][:, :, 1:], seen["q_rope"][:, :, 1:])


def test_partial_rotary_leaves_the_tail_channels_alone():
    cfg = {
        "head_dim": 8,
        "hidden_size": 16,
        "num_attention_heads": 2,
        "partial_rotary_factor": 0.5,
        "rope_theta": 10000.0,
    }
    x = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    cos, sin = reference.rope_cos_sin(cfg, torch.arange(3), torch.float64)
    y = reference.apply_rope(x, cos, sin)
    assert cos.shape[-1] == 4
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert not torch.allclose(y[..., 1:, :4], x[..., 1:, :4])


def test_reference_imports_no_transformers():
    code = "import sys, opensci_patch.measure.reference; print(any(m.startswith('transformers') for m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert json.loads(out.stdout.strip().lower()) is False


def test_corrupt_weights_raise_model_dir_error(model_dir: Path):
    import pytest

    from opensci_patch._util.errors import ModelDirError

    (model_dir / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelDirError):
        reference.load_params(model_dir)


# --- what it models, and "not applicable" for the rest (issue 29) -----------------------------------------------


def test_the_shipped_and_a_llama_shaped_checkpoint_are_modelled(model_dir: Path, tmp_path: Path):
    import rotary_era

    assert reference.not_modelled(model_dir) is None
    assert reference.not_modelled(rotary_era.build(tmp_path / "cached", "cached")) is None


def test_other_architectures_are_not_applicable_with_the_reason(tmp_path: Path):
    import rotary_era

    fused = rotary_era.build(tmp_path / "fused", "cached", fused=True)
    assert "fused projection: model.layers.0.self_attn.qkv_proj.weight" in reference.not_modelled(fused)
    layer_norm = rotary_era.build(tmp_path / "partial", "partial")  # LayerNorm with a bias, 25% rotary
    assert "input_layernorm.bias" in reference.not_modelled(layer_norm)
    config = json.loads((fused / "config.json").read_text())
    config["num_layers"] = config.pop("num_hidden_layers")  # a config naming its sizes otherwise
    (fused / "config.json").write_text(json.dumps(config))
    assert "no num_hidden_layers" in reference.not_modelled(fused)


def test_a_fused_qkv_model_records_the_reference_as_not_applicable_and_keeps_its_result(tmp_path: Path):
    """The issue-29 crash: KeyError on q_proj made the capture a crash and threw the model's own result away."""
    import rotary_era

    from opensci_patch.measure import records
    from opensci_patch.measure.capture import CaptureSettings, capture
    from opensci_patch.measure.isolation import isolated_hf_cache
    from opensci_patch.rewrite.hotfix import hotfix

    got = {}
    for fused in (False, True):
        src = rotary_era.build(tmp_path / f"era-{fused}", "cached", fused=fused)
        fixed = hotfix(src, log=lambda *a: None).dst
        with isolated_hf_cache():
            got[fused] = capture(CaptureSettings(model=fixed, max_new_tokens=2, reference="on"), log=lambda *a: None)
    rec = got[True]
    assert rec.status == "ok", rec.error
    assert rec.reference.not_applicable.startswith("not applicable: no weight")
    assert rec.reference.max_abs_diff is None
    assert got[False].reference.applicable  # the same weights unfused: the reference runs
    assert rec.logits_sha256 == got[False].logits_sha256  # its own result is kept (the same numbers, stacked)
    (tmp_path / "r.json").write_text(json.dumps(rec.to_dict()))
    assert records.load(tmp_path / "r.json").reference.not_applicable == rec.reference.not_applicable
