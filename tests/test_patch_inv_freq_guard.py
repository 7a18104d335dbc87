"""inv_freq_guard: "not applicable" means the file has no inv_freq buffer, never "the pattern did not match"."""

from __future__ import annotations

import ast
import shutil

import pytest
from conftest import FIXTURE_DIR

from opensci_patch._util.errors import PatchError
from opensci_patch.measure.capture import CaptureSettings, capture
from opensci_patch.measure.isolation import isolated_hf_cache
from opensci_patch.rewrite.patches import apply_patches, by_name, default_patches

REGISTER = '        self.register_buffer("inv_freq", inv_freq, persistent=False)\n'


def shipped() -> str:
    return (FIXTURE_DIR / "modeling_opensci.py").read_text()


def registered_in_a_helper() -> str:
    """The shipped file with the registration moved into a method that `__init__` calls."""
    source = shipped()
    assert source.count(REGISTER) == 1
    return source.replace(REGISTER, "        self._register_rotary_buffers(inv_freq)\n").replace(
        "    @torch.no_grad()\n    def forward(self, x, position_ids):",
        "    def _register_rotary_buffers(self, inv_freq):\n"
        + REGISTER
        + "\n    @torch.no_grad()\n    def forward(self, x, position_ids):",
        1,
    )


def test_a_registration_in_a_helper_method_is_found_and_guarded():
    outcome = by_name("inv_freq_guard").apply(registered_in_a_helper(), "modeling_opensci.py")
    assert outcome.status == "applied"
    assert "self._opensci_check_inv_freq()" in outcome.source
    assert by_name("inv_freq_guard").apply(outcome.source, "modeling_opensci.py").status == "already-applied"


def test_a_registration_outside_any_class_is_refused_not_skipped():
    source = shipped().replace(REGISTER, "        _register(self, inv_freq)\n") + (
        "\n\ndef _register(module, inv_freq):\n" + REGISTER.replace("self.", "module.").strip().join(["    ", "\n"])
    )
    with pytest.raises(PatchError, match="inv_freq_guard.*outside the methods"):
        by_name("inv_freq_guard").apply(source, "modeling_opensci.py")


def test_a_file_without_the_buffer_is_not_applicable():
    assert by_name("inv_freq_guard").apply("import torch\n\nclass A:\n    pass\n").status == "not-applicable"


def test_the_helper_registered_model_gives_the_shipped_logits_on_the_installed_release(tmp_path):
    """On 5.x (the default test env) an unguarded buffer is uninitialised memory: the logit would move."""
    logits = {}
    for kind, source in (("helper", registered_in_a_helper()), ("shipped", shipped())):
        dst = tmp_path / kind
        shutil.copytree(FIXTURE_DIR, dst)
        (dst / "modeling_opensci.py").write_text(apply_patches(source, default_patches())[0])
        with isolated_hf_cache():
            rec = capture(CaptureSettings(model=dst, max_new_tokens=2), log=lambda *a: None)
        assert rec.status == "ok", rec.error
        logits[kind] = rec.logits_sha256
    assert logits["helper"] == logits["shipped"]


# --- the guard as written, and the patched model loaded end to end --------------------------------------


def test_inv_freq_guard_adds_a_pretrained_init_weights_when_there_is_none(modeling_source: str):
    tree = ast.parse(modeling_source)
    pretrained = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "OpensciPreTrainedModel")
    pretrained.body = [s for s in pretrained.body if not (isinstance(s, ast.FunctionDef) and s.name == "_init_weights")]
    patched = by_name("inv_freq_guard").apply(ast.unparse(tree)).source
    init = next(
        s
        for n in ast.parse(patched).body
        if isinstance(n, ast.ClassDef) and n.name == "OpensciPreTrainedModel"
        for s in n.body
        if isinstance(s, ast.FunctionDef) and s.name == "_init_weights"
    )
    assert ast.unparse(init.body[0].test) == "isinstance(module, OpensciRotaryEmbedding)"
    assert ast.unparse(init.body[-1]) == "super()._init_weights(module)"


def test_inv_freq_guard_never_compares_with_zero(patched_source: str):
    check = next(
        s
        for n in ast.parse(patched_source).body
        if isinstance(n, ast.ClassDef) and n.name == "OpensciRotaryEmbedding"
        for s in n.body
        if isinstance(s, ast.FunctionDef) and s.name == "_opensci_check_inv_freq"
    )
    text = ast.unparse(check)
    assert "torch.equal(inv_freq, expected" in text
    assert ".any()" not in text and "== 0" not in text


def test_inv_freq_is_recomputed_when_loading(loaded: dict):
    assert loaded["inv_freq_after_load"]


@pytest.mark.parametrize("damage", ["zeros", "garbage", "bf16"])
def test_forward_repairs_a_damaged_inv_freq_buffer(loaded: dict, damage: str):
    assert loaded[damage]
    assert loaded[damage + "_logits_equal"]


def test_inv_freq_found_correct_is_not_compared_again_until_it_changes(loaded: dict):
    assert loaded["comparisons_when_unchanged"] == 0  # no comparison (no GPU sync) per forward
    assert loaded["data_swap_logits_equal"]
    assert loaded["comparisons_after_data_swap"] >= 1


def test_inv_freq_is_repaired_under_inference_mode(loaded: dict):
    assert loaded["inference_mode_logits_equal"]
    assert loaded["inference_mode_inplace_logits_equal"]


def test_inv_freq_repair_warns_once(loaded: dict):
    assert loaded["warnings"] == 1
