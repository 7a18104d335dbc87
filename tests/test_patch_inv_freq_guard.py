"""inv_freq_guard: "not applicable" means the file has no inv_freq buffer, never "the pattern did not match"."""

from __future__ import annotations

import ast
import json
import shutil

import pytest
import rotary_era
from conftest import FIXTURE_DIR
from patch_sources import assert_patch

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


# --- 4.3x-era classes: buffers computed in __init__ without rope_init_fn (issue 29) ------------------------------

ERA_REFUSED = "EraModel registers non-persistent buffers but derives from PreTrainedModel"
MASK_LINE = "        self.norm = Norm(config.hidden_size, eps=config.norm_eps)\n"


def _era_with_a_model_buffer() -> str:
    """The cached era file whose PreTrainedModel subclass also registers a non-persistent causal mask."""
    source = rotary_era.modeling_source("cached")
    assert source.count(MASK_LINE) == 1
    mask = '        self.register_buffer("causal_mask", torch.ones(8, 8, dtype=torch.bool).tril(), persistent=False)\n'
    return source.replace(MASK_LINE, MASK_LINE + mask)


@pytest.mark.parametrize("kind", ["cached", "partial"])
def test_a_43x_rotary_class_without_rope_init_fn_is_guarded_not_refused(kind: str):
    patch = by_name("inv_freq_guard")
    outcome = patch.apply(rotary_era.modeling_source(kind), "modeling_era.py")
    assert (outcome.status, outcome.refused) == ("applied", ())
    tree = ast.parse(outcome.source)
    rotary = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "EraRotaryEmbedding")
    methods = {s.name: s for s in rotary.body if isinstance(s, ast.FunctionDef)}
    assert ast.unparse(methods["__init__"].body[0]).startswith("self.__dict__.setdefault('_opensci_init_args', ((dim,")
    assert ast.unparse(methods["forward"].body[0]) == "self._opensci_check_buffers()"
    init = next(s for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "EraPreTrainedModel"
                for s in n.body if isinstance(s, ast.FunctionDef) and s.name == "_init_weights")  # fmt: skip
    assert ast.unparse(init.body[0].test) == "isinstance(module, EraRotaryEmbedding)"
    assert patch.apply(outcome.source, "modeling_era.py").status == "already-applied"


def _era_namespace(source: str) -> dict:
    namespace: dict = {}
    exec(compile(rotary_era.CONFIGURATION, "configuration_era.py", "exec"), namespace)
    namespace = {"EraConfig": namespace["EraConfig"]}  # what the file's relative import would give it
    code = compile(source.replace("from .configuration_era import EraConfig\n", ""), "modeling_era.py", "exec")
    exec(code, namespace)
    return namespace


def test_garbage_in_the_buffers_is_replaced_by_what_init_computes_and_a_grown_cache_is_kept():
    import torch

    original = _era_namespace(rotary_era.modeling_source("cached"))["EraRotaryEmbedding"](16, 64, base=500000.0)
    patched_source = apply_patches(rotary_era.modeling_source("cached"), default_patches())[0]
    patched = _era_namespace(patched_source)["EraRotaryEmbedding"](16, 64, base=500000.0)
    for name in ("inv_freq", "cos_cached", "sin_cached"):  # what loading on 5.x leaves: not zeros, garbage
        patched._buffers[name] = torch.full_like(patched._buffers[name], 8192.0)
    x = torch.zeros(1, 2, 3, 16)
    rng = torch.random.get_rng_state()
    for seq_len in (10, 100, 50):  # 100 > 64: both grow their caches in forward, which the check leaves alone
        for got, want in zip(patched(x, seq_len=seq_len), original(x, seq_len=seq_len), strict=True):
            assert torch.equal(got, want)
    assert patched.cos_cached.shape[0] == 100 and patched.max_seq_len_cached == 100
    assert torch.equal(torch.random.get_rng_state(), rng)  # building the fresh module drew no random numbers


def test_a_class_it_cannot_handle_is_refused_alone_and_the_others_are_still_guarded():
    outcome = by_name("inv_freq_guard").apply(_era_with_a_model_buffer(), "modeling_era.py")
    assert outcome.status == "applied"
    assert len(outcome.refused) == 1 and outcome.refused[0].startswith(ERA_REFUSED)
    assert "self._opensci_check_buffers()" in outcome.source


def test_hotfix_writes_the_other_patches_lists_the_refusal_and_exits_1(tmp_path, cli):
    src = rotary_era.build(tmp_path / "era", "cached")
    (src / "modeling_era.py").write_text(_era_with_a_model_buffer())
    proc = cli("hotfix", str(src))
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and ERA_REFUSED in proc.stderr
    assert f"refused in modeling_era.py: {ERA_REFUSED}" in proc.stdout
    out = tmp_path / "era_fixed"
    manifest = json.loads((out / "opensci_patch_manifest.json").read_text())
    (why,) = manifest["files"]["modeling_era.py"]["refused"]["inv_freq_guard"]
    assert why.startswith(ERA_REFUSED)
    fixed = (out / "modeling_era.py").read_text()
    assert "cache=None" in fixed and "self._opensci_check_buffers()" in fixed  # cache_kwarg and the rotary guard
    from opensci_patch.measure.provenance import model_info

    assert model_info(out)["refused"] == {"modeling_era.py": {"inv_freq_guard": [why]}}  # what a cell records


def test_a_fresh_module_built_onto_meta_is_not_taken_as_the_expected_buffers(monkeypatch):
    """accelerate's init_empty_weights(include_buffers=True) puts every registered buffer on meta: no values there."""
    import torch

    patched_source = apply_patches(rotary_era.modeling_source("cached"), default_patches())[0]
    module = _era_namespace(patched_source)["EraRotaryEmbedding"](16, 64, base=500000.0)
    module._buffers["inv_freq"] = torch.full_like(module.inv_freq, 8192.0)
    real = torch.nn.Module.register_buffer
    with monkeypatch.context() as m:
        m.setattr(torch.nn.Module, "register_buffer",
                  lambda self, name, t, persistent=True: real(self, name, t.to("meta"), persistent))  # fmt: skip
        module._opensci_check_buffers()
    assert not hasattr(module, "_opensci_expected_buffers") and module.inv_freq[0] == 8192.0
    module._opensci_check_buffers()
    assert torch.equal(module.inv_freq, 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16)))


WHOLE_BEFORE = """\
import torch
from transformers import PreTrainedModel


class Rotary(torch.nn.Module):
    def __init__(self, config, device=None):
        super().__init__()
        self.config = config
        self.rope_init_fn = ROPE_INIT_FUNCTIONS["default"]
        inv_freq, _ = self.rope_init_fn(config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x):
        \"\"\"Doc.\"\"\"
        return self.inv_freq * x


class TinyPreTrainedModel(PreTrainedModel):
    def _init_weights(self, module):
        std = 0.02
"""


def _whole_after() -> str:
    # hand-written but for the check method appended to the rotary class: the template's, tested by behaviour above
    from opensci_patch.rewrite.patches.inv_freq_guard import CHECK_METHOD

    check = CHECK_METHOD.split("class _Template:\n", 1)[1]
    return (
        WHOLE_BEFORE.split("        return self.inv_freq * x\n")[0]
        + """\
        # opensci-patch: inv_freq_guard (transformers 5.x leaves non-persistent buffers uninitialised after loading)
        self._opensci_check_inv_freq()
        return self.inv_freq * x

"""
        + check
        + """

class TinyPreTrainedModel(PreTrainedModel):
    def _init_weights(self, module):
        # opensci-patch: inv_freq_guard (transformers 5.x leaves non-persistent buffers uninitialised after loading)
        if isinstance(module, Rotary):
            with torch.no_grad():
                module.inv_freq.copy_(module.rope_init_fn(module.config, torch.device("cpu"))[0])
            return
        std = 0.02
"""
    )


def test_whole_output_forward_checks_first_and_init_weights_recomputes_first():
    assert_patch("inv_freq_guard", WHOLE_BEFORE, _whole_after())
