"""The source patches: each applies to the fixture, verifies, is idempotent, refuses what it cannot read,
and the patched model loads and computes the right thing under the installed transformers."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from opensci_patch.errors import PatchError
from opensci_patch.patches import PATCHES, apply_patches, by_name, default_patches, select

FIXTURE = Path(__file__).resolve().parents[1] / "opensci_patch" / "data" / "opensci-tiny"
NAMES = [p.name for p in PATCHES]

# The constructs of a modular-generated model file (transformers 4.54) that the shipped, hand-written
# file does not have: the target of moved_helpers. tests/test_crossversion.py runs a whole such file.
GENERATED = """\
import torch
from torch import nn

from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import auto_docstring, can_return_tuple
from transformers.utils.generic import check_model_inputs


class OsrModel(PreTrainedModel):
    @check_model_inputs
    @auto_docstring
    def forward(self, inputs_embeds=None, attention_mask=None, cache_position=None, past_key_values=None):
        mask_kwargs = {
            "config": self.config,
            "input_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "cache_position": cache_position,
            "past_key_values": past_key_values,
        }
        return create_causal_mask(**mask_kwargs), create_sliding_window_causal_mask(**mask_kwargs)
"""

# A 4.4x-era file built on a library config class, which reads `config.rope_theta`: the target of rope_theta.
LLAMA_STYLE = """\
import torch
from torch import nn


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, config, device=None):
        super().__init__()
        self.rope_theta = config.rope_theta
        dim = config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
"""

# patch -> (text in the fixture, what it becomes): a target the patch must refuse to guess at
MANGLED = {
    "loss_kwargs": ("import LossKwargs, TransformersKwargs", "import LossKwargs as LK, TransformersKwargs"),
    "rope_default": ("= ROPE_INIT_FUNCTIONS[self.rope_type]", "= ROPE_INIT_FUNCTIONS.get(self.rope_type)"),
    "tied_weights": ("self.model = OpensciModel(config)", "self.model = build_base_model(config)"),
    "sdpa_gqa": (
        "ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]",
        "ALL_ATTENTION_FUNCTIONS.get(self.config._attn_implementation)",
    ),
    "inv_freq_guard": ("self.config = config\n        self.rope_init_fn", "self.rope_init_fn"),
    "init_weights": ("module.bias.data.zero_()", "module.bias.data = torch.zeros_like(module.bias)"),
    "moved_helpers": ("import create_causal_mask, create_sliding", "import create_causal_mask as ccm, create_sliding"),
    "rope_theta": ("self.rope_theta = config.rope_theta", 'self.rope_theta = getattr(config, "rope_theta", 1e4)'),
    "cache_kwarg": (
        "        logits_to_keep: Union[int, torch.Tensor] = 0,\n",
        "        logits_to_keep: Union[int, torch.Tensor] = 0,\n        cache: Optional[Cache] = None,\n",
    ),
}


@pytest.fixture(scope="module")
def modeling_source() -> str:
    return (FIXTURE / "modeling_opensci.py").read_text()


@pytest.fixture(scope="module")
def patched_source(modeling_source: str) -> str:
    return apply_patches(modeling_source, PATCHES, "modeling_opensci.py")[0]


def target_source(name: str, modeling_source: str) -> str:
    """The source a patch has a target in: the shipped file, or for moved_helpers and rope_theta a small one."""
    return {"moved_helpers": GENERATED, "rope_theta": LLAMA_STYLE}.get(name, modeling_source)


def _function(source: str, name: str, **namespace):
    """Compile one top-level function of `source` on its own (the patched file needs transformers to import)."""
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module([node], type_ignores=[]), name, "exec"), namespace)
    return namespace[name]


def _class_attribute(source: str, cls: str, attribute: str):
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    assign = next(s for s in node.body if isinstance(s, ast.Assign) and s.targets[0].id == attribute)
    return ast.literal_eval(assign.value)


# --- the contract, for every patch ----------------------------------------------------------------


def test_registry_order_and_defaults():
    assert NAMES == [
        "loss_kwargs",
        "moved_helpers",
        "cache_kwarg",
        "rope_theta",
        "rope_default",
        "tied_weights",
        "sdpa_gqa",
        "inv_freq_guard",
        "init_weights",
    ]
    assert [p.name for p in default_patches()] == NAMES[:8]
    assert [p.name for p in select(["init_weights"])] == NAMES
    with pytest.raises(PatchError, match="unknown patch 'nope'"):
        select(["nope"])


def test_a_new_patch_module_is_found_by_itself_in_its_order(tmp_path, monkeypatch):
    """Adding a patch is one new module in opensci_patch/patches: the registry discovers and orders it."""
    import opensci_patch.patches as registry

    package = tmp_path / "fake_patches"
    package.mkdir()
    for name, order in (("zeta", 5), ("alpha", 95), ("not_a_patch", None)):
        body = (
            ""
            if order is None
            else (
                "from opensci_patch.patches.base import Patch, State\n"
                f"PATCH = Patch(name={name!r}, order={order}, description='', default=True,\n"
                "              inspect=lambda tree: State.ABSENT, rewrite=lambda tree: tree)\n"
            )
        )
        (package / f"{name}.py").write_text(body)
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "__path__", [str(package)])
    monkeypatch.setattr(registry, "__name__", "fake_patches")
    assert [p.name for p in registry._discover()] == ["zeta", "alpha"]
    (package / "beta.py").write_text((package / "alpha.py").read_text().replace("alpha", "beta"))
    with pytest.raises(RuntimeError, match="share an order"):
        registry._discover()


@pytest.mark.parametrize("name", NAMES)
def test_patch_applies_to_fixture_and_marks_the_change(modeling_source: str, name: str):
    source = target_source(name, modeling_source)
    outcome = by_name(name).apply(source, "modeling_opensci.py")
    assert outcome.status == "applied"
    assert outcome.source != source
    assert f"# opensci-patch: {name}" in outcome.source
    compile(outcome.source, "modeling_opensci.py", "exec")


@pytest.mark.parametrize("name", NAMES)
def test_second_application_is_already_applied_with_identical_text(modeling_source: str, name: str):
    once = by_name(name).apply(target_source(name, modeling_source)).source
    twice = by_name(name).apply(once)
    assert twice.status == "already-applied"
    assert twice.source == once


@pytest.mark.parametrize("name", NAMES)
def test_patch_is_not_applicable_to_the_configuration_file(name: str):
    source = (FIXTURE / "configuration_opensci.py").read_text()
    outcome = by_name(name).apply(source, "configuration_opensci.py")
    assert outcome.status == "not-applicable"
    assert outcome.source == source


@pytest.mark.parametrize("name", NAMES)
def test_patch_refuses_a_mangled_target_naming_patch_and_file(modeling_source: str, name: str):
    old, new = MANGLED[name]
    source = target_source(name, modeling_source)
    assert source.count(old) == 1
    with pytest.raises(PatchError, match=rf"patch '{name}'.*modeling_opensci\.py"):
        by_name(name).apply(source.replace(old, new), "modeling_opensci.py")


def test_all_patches_together_are_idempotent(patched_source: str):
    again, statuses = apply_patches(patched_source, PATCHES)
    assert again == patched_source
    assert statuses == {
        n: "not-applicable" if n in ("moved_helpers", "rope_theta") else "already-applied" for n in NAMES
    }


def test_patches_find_targets_by_structure_not_by_name(modeling_source: str):
    """Other class and attribute names and another import layout, as in a real checkpoint's file."""
    variant = (
        modeling_source.replace("Opensci", "Osr")
        .replace("embed_tokens", "wte")
        .replace("self.model", "self.transformer")
        .replace(
            "from transformers.utils import LossKwargs, TransformersKwargs, logging",
            "# kwargs types\nfrom transformers.utils import (\n    LossKwargs,\n    logging,\n"
            "    TransformersKwargs,\n)",
        )
    )
    patched, statuses = apply_patches(variant, default_patches(), "modeling_osr.py")
    assert statuses == {
        p.name: "not-applicable" if p.name in ("moved_helpers", "rope_theta") else "applied" for p in default_patches()
    }
    assert _class_attribute(patched, "OsrForCausalLM", "_tied_weights_keys") == {
        "lm_head.weight": "transformer.wte.weight"
    }
    assert "isinstance(module, OsrRotaryEmbedding)" in patched
    assert "from transformers.utils import (\n    logging,\n)" in patched
    assert apply_patches(patched, default_patches())[0] == patched


# --- what each rewrite produces -------------------------------------------------------------------


def test_loss_kwargs_leaves_one_transformers_kwargs_base(patched_source: str):
    tree = ast.parse(patched_source)
    kwargs_cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "KwargsForCausalLM")
    assert [ast.unparse(b) for b in kwargs_cls.bases] == ["FlashAttentionKwargs", "TransformersKwargs"]
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "LossKwargs" not in names | imported


def test_loss_kwargs_fallback_defines_an_empty_typeddict_where_transformers_lacks_it(patched_source, monkeypatch):
    import typing

    transformers_utils = pytest.importorskip("transformers.utils")
    monkeypatch.delattr(transformers_utils, "TransformersKwargs", raising=False)
    guard = next(n for n in ast.parse(patched_source).body if isinstance(n, ast.Try))
    namespace: dict = {}
    exec(compile(ast.Module([guard], type_ignores=[]), "guard", "exec"), namespace)
    fallback = namespace["TransformersKwargs"]
    assert typing.is_typeddict(fallback)
    assert fallback.__total__ is False
    assert fallback.__annotations__ == {}


def _rope_448(config, device=None):
    """transformers 4.48 `_compute_default_rope_parameters`, verbatim in substance."""
    import torch

    base = config.rope_theta
    partial_rotary_factor = config.partial_rotary_factor if hasattr(config, "partial_rotary_factor") else 1.0
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    dim = int(head_dim * partial_rotary_factor)
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim)), 1.0


@pytest.mark.parametrize(
    "config",
    [
        SimpleNamespace(rope_theta=10000.0, hidden_size=96, num_attention_heads=4, head_dim=24),
        SimpleNamespace(rope_theta=500000.0, hidden_size=2048, num_attention_heads=16, head_dim=128),
        SimpleNamespace(
            rope_theta=10000, hidden_size=96, num_attention_heads=4, head_dim=24, partial_rotary_factor=0.5
        ),
    ],
    ids=["fixture", "llama3-like", "partial-rotary"],
)
def test_inlined_default_rope_is_bit_identical_to_448(patched_source: str, config):
    torch = pytest.importorskip("torch")
    rope = _function(patched_source, "_opensci_default_rope_init", torch=torch)
    inv_freq, scaling = rope(config, torch.device("cpu"))
    expected, _ = _rope_448(config)
    assert torch.equal(inv_freq, expected)
    assert scaling == 1.0


def test_inlined_default_rope_reads_rope_theta_from_rope_parameters(patched_source: str):
    """transformers 5.x may keep rope_theta only in `rope_parameters`."""
    torch = pytest.importorskip("torch")
    rope = _function(patched_source, "_opensci_default_rope_init", torch=torch)
    moved = SimpleNamespace(rope_parameters={"rope_theta": 500000.0}, hidden_size=96, num_attention_heads=4)
    plain = SimpleNamespace(rope_theta=500000.0, hidden_size=96, num_attention_heads=4, head_dim=24)
    assert torch.equal(rope(moved)[0], _rope_448(plain)[0])


def test_rope_lookup_keeps_other_rope_types_in_the_registry(patched_source: str):
    assert (
        'self.rope_init_fn = _opensci_default_rope_init if self.rope_type == "default" '
        "else ROPE_INIT_FUNCTIONS[self.rope_type]" in patched_source
    )


def test_rope_lookup_used_as_a_call_is_parenthesised():
    source = textwrap.dedent(
        """
        import torch
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        def init(config, rope_type):
            return ROPE_INIT_FUNCTIONS[rope_type](config, None)[0] * 2
        """
    )
    patched = by_name("rope_default").apply(source).source
    guard = '(_opensci_default_rope_init if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type])'
    assert f"return {guard}(config, None)[0] * 2" in patched


def test_rope_lookup_of_the_literal_default_key_is_replaced_outright():
    source = "import torch\nfrom transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS\n\n\n"
    source += 'rope_init = ROPE_INIT_FUNCTIONS["default"]\nlinear = ROPE_INIT_FUNCTIONS["linear"]\n'
    outcome = by_name("rope_default").apply(source)
    assert outcome.status == "applied"
    assert "rope_init = _opensci_default_rope_init\n" in outcome.source
    assert 'linear = ROPE_INIT_FUNCTIONS["linear"]\n' in outcome.source
    assert by_name("rope_default").apply(outcome.source).status == "already-applied"


@pytest.mark.parametrize("groups", [1, 2])
def test_inlined_sdpa_matches_attention_math_without_enable_gqa(patched_source: str, monkeypatch, groups: int):
    torch = pytest.importorskip("torch")
    sdpa = _function(patched_source, "_opensci_sdpa_attention_forward", torch=torch)
    seen: list[dict] = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: seen.append(k) or real(*a, **k)
    )
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=gen)
    k, v = (torch.randn(2, 4 // groups, 5, 8, generator=gen) for _ in range(2))
    out, weights = sdpa(SimpleNamespace(num_key_value_groups=groups), q, k, v, None, scaling=0.25)
    k_rep, v_rep = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    scores = (q @ k_rep.transpose(2, 3)) * 0.25 + torch.full((5, 5), float("-inf")).triu(1)
    expected = (scores.softmax(-1) @ v_rep).transpose(1, 2)
    assert weights is None
    assert torch.allclose(out, expected, atol=1e-6)
    assert len(seen) == 1 and "enable_gqa" not in seen[0] and seen[0]["is_causal"] is True


def test_sdpa_dispatch_keeps_other_backends_in_the_registry(patched_source: str):
    assert (
        'attention_interface = _opensci_sdpa_attention_forward if self.config._attn_implementation == "sdpa" '
        "else ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]" in patched_source
    )


def test_tied_weights_become_a_dict_derived_from_the_code(patched_source: str):
    assert _class_attribute(patched_source, "OpensciForCausalLM", "_tied_weights_keys") == {
        "lm_head.weight": "model.embed_tokens.weight"
    }


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


def _init_weights_of(source: str, torch):
    """The pretrained class's `_init_weights` from `source`, as a plain function."""
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "OpensciPreTrainedModel")
    method = next(s for s in cls.body if isinstance(s, ast.FunctionDef) and s.name == "_init_weights")
    namespace = {"torch": torch, "nn": torch.nn}
    namespace["OpensciRMSNorm"] = type("OpensciRMSNorm", (torch.nn.Module,), {})
    namespace["OpensciRotaryEmbedding"] = type("OpensciRotaryEmbedding", (torch.nn.Module,), {})
    exec(compile(ast.Module([method], type_ignores=[]), "init", "exec"), namespace)
    return namespace["_init_weights"]


def test_init_weights_rewrite_leaves_no_data_access(modeling_source: str):
    patched = by_name("init_weights").apply(modeling_source).source
    tree = ast.parse(patched)
    init = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_init_weights")
    assert not [n for n in ast.walk(init) if isinstance(n, ast.Attribute) and n.attr == "data"]
    assert "nn.init.normal_(module.weight, mean=0.0, std=std)" in patched


def test_init_weights_rewrite_keeps_loaded_weights_under_the_5x_guard(modeling_source: str):
    """5.0/5.1 re-run _init_weights after loading with torch.nn.init guarded per tensor: `.data` wipes, nn.init not."""
    torch = pytest.importorskip("torch")
    initialization = pytest.importorskip("transformers.initialization")
    if not hasattr(initialization, "guard_torch_init_functions"):
        pytest.skip("this transformers has no per-tensor init guard")
    patched = by_name("init_weights").apply(modeling_source).source
    owner = SimpleNamespace(config=SimpleNamespace(initializer_range=0.02))
    for source, survives in ((modeling_source, False), (patched, True)):
        embedding = torch.nn.Embedding(6, 4, padding_idx=1)
        linear = torch.nn.Linear(4, 4)
        with torch.no_grad():
            embedding.weight.fill_(3.0)
            linear.bias.fill_(3.0)
        for param in (embedding.weight, linear.weight, linear.bias):
            param._is_hf_initialized = True  # what 5.x sets on loaded tensors
        with initialization.guard_torch_init_functions():
            for module in (embedding, linear):
                _init_weights_of(source, torch)(owner, module)
        assert bool((embedding.weight == 3.0).all()) is survives
        assert bool((linear.bias == 3.0).all()) is survives


def test_init_weights_rewrite_still_initialises_a_fresh_embedding(modeling_source: str):
    torch = pytest.importorskip("torch")
    patched = by_name("init_weights").apply(modeling_source).source
    embedding = torch.nn.Embedding(6, 4, padding_idx=1)
    with torch.no_grad():
        embedding.weight.fill_(3.0)
    _init_weights_of(patched, torch)(SimpleNamespace(config=SimpleNamespace(initializer_range=0.02)), embedding)
    assert bool((embedding.weight[1] == 0).all())
    assert not bool((embedding.weight == 3.0).any())


# --- moved_helpers: what the inserted code does ----------------------------------------------------


def _check_guard(monkeypatch, generic_names: dict, capture_outputs=None) -> dict:
    """Run the patched file's check_model_inputs guard against fake transformers.utils modules."""
    import types

    generic = types.ModuleType("transformers.utils.generic")
    for key, value in generic_names.items():
        setattr(generic, key, value)
    monkeypatch.setitem(sys.modules, "transformers.utils.generic", generic)
    capturing = types.ModuleType("transformers.utils.output_capturing")
    if capture_outputs is not None:
        capturing.capture_outputs = capture_outputs
    monkeypatch.setitem(sys.modules, "transformers.utils.output_capturing", capturing)
    tree = ast.parse(by_name("moved_helpers").apply(GENERATED).source)
    guard = next(n for n in tree.body if isinstance(n, ast.Try) and "check_model_inputs" in ast.unparse(n.body[0]))
    namespace: dict = {}
    exec(compile(ast.Module([guard], type_ignores=[]), "guard", "exec"), namespace)
    return namespace


def test_check_model_inputs_fallback_composes_the_two_5_2_decorators(monkeypatch):
    """Where transformers.utils.generic has no check_model_inputs (5.2-5.22), it is built from its successors."""
    calls = []
    namespace = _check_guard(
        monkeypatch,
        {"merge_with_config_defaults": lambda f: calls.append(("merge", f)) or ("merged", f)},
        lambda f, tie_last_hidden_states=True: calls.append(("capture", f, tie_last_hidden_states)) or ("captured", f),
    )

    def forward():
        return None

    assert namespace["check_model_inputs"](forward) == ("merged", ("captured", forward))
    assert namespace["check_model_inputs"](tie_last_hidden_states=False)(forward) == ("merged", ("captured", forward))
    assert calls == [("capture", forward, True), ("merge", ("captured", forward))] + [
        ("capture", forward, False),
        ("merge", ("captured", forward)),
    ]


class _Output:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def to_tuple(self):
        return tuple(self.kwargs.values())


def test_check_model_inputs_stand_in_before_4_54_applies_the_config_defaults(monkeypatch):
    check = _check_guard(monkeypatch, {})["check_model_inputs"]  # neither it nor its successors exist

    class Model:
        config = SimpleNamespace(use_cache=True, return_dict=True, output_attentions=False)
        training = False

        @check
        def forward(self, input_ids=None, use_cache=None, **kwargs):
            return _Output(use_cache=use_cache, rest=sorted(kwargs))

    model = Model()
    assert model.forward(1).kwargs == {"use_cache": True, "rest": []}
    assert model.forward(1, use_cache=False).kwargs["use_cache"] is False
    assert model.forward(1, return_dict=False) == (True, [])
    assert model.forward(1, output_attentions=False, output_hidden_states=None).kwargs["rest"] == []
    with pytest.raises(NotImplementedError, match="output_attentions needs transformers >= 4.54"):
        model.forward(1, output_attentions=True)
    Model.config.output_hidden_states = True
    with pytest.raises(NotImplementedError, match="output_hidden_states"):
        model.forward(1)


def _stand_in(name: str):
    """The stand-in the patch inserts for `name` (the except branch of its guard), compiled on its own."""
    tree = ast.parse(by_name("moved_helpers").apply(GENERATED).source)
    guard = next(n for n in tree.body if isinstance(n, ast.Try) and f"import {name}" in ast.unparse(n.body[0]))
    import torch

    namespace: dict = {"torch": torch}
    exec(compile(ast.Module(guard.handlers[0].body, type_ignores=[]), name, "exec"), namespace)
    return namespace[name]


def test_causal_mask_stand_in_builds_4_54s_eager_and_sdpa_masks():
    torch = pytest.importorskip("torch")
    mask = _stand_in("create_causal_mask")
    embeds = torch.zeros(2, 4, 8)
    config = SimpleNamespace(_attn_implementation="eager")
    eager = mask(config, embeds, None, torch.arange(4), None)
    low = torch.finfo(torch.float32).min
    expected = torch.where(torch.ones(4, 4, dtype=torch.bool).tril(), torch.tensor(0.0), torch.tensor(low))
    assert eager.shape == (2, 1, 4, 4) and torch.equal(eager[0, 0], expected) and torch.equal(eager[1, 0], expected)
    padding = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    padded = mask(config, embeds, padding, torch.arange(4), None)
    assert bool((padded[1, 0, :, 0] == low).all()) and torch.equal(padded[0, 0], expected)
    config._attn_implementation = "sdpa"
    assert mask(config, embeds, None, torch.arange(4), None) is None  # SDPA's own is_causal
    assert mask(config, embeds, torch.ones(2, 4), torch.arange(4), None) is None
    assert torch.equal(mask(config, embeds, padding, torch.arange(4), None), padded == 0)
    past = SimpleNamespace(get_seq_length=lambda: 4)  # one new token after four cached ones
    step = mask(SimpleNamespace(_attn_implementation="eager"), embeds[:, :1], None, torch.tensor([4]), past)
    assert step.shape == (2, 1, 1, 5) and bool((step == 0).all())


def test_sliding_window_mask_stand_in_limits_how_far_back_a_query_sees():
    torch = pytest.importorskip("torch")
    mask = _stand_in("create_sliding_window_causal_mask")
    config = SimpleNamespace(_attn_implementation="sdpa", sliding_window=2)
    allowed = mask(config, torch.zeros(1, 4, 8), None, torch.arange(4), None)[0, 0]
    assert allowed.tolist() == [[True, False, False, False], [True, True, False, False],
                                [False, True, True, False], [False, False, True, True]]  # fmt: skip


def test_moved_helpers_refuses_a_mask_import_inside_a_function():
    nested = GENERATED.replace(
        "from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask\n", ""
    ).replace(
        "        mask_kwargs = {",
        "        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask\n\n"
        "        mask_kwargs = {",
    )
    with pytest.raises(PatchError, match="moved_helpers.*not a top-level import"):
        by_name("moved_helpers").apply(nested, "modeling_opensci.py")


CACHE_4_56 = """\
import torch

from transformers.cache_utils import Cache, DynamicCache


class OsrModel:
    def forward(self, use_cache=True, past_key_values=None):
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        return past_key_values
"""


def test_dynamic_cache_shim_only_where_the_installed_cache_takes_no_config():
    patch = by_name("moved_helpers")
    assert patch.apply(CACHE_4_56.replace("DynamicCache(config=self.config)", "DynamicCache()")).status == (
        "not-applicable"
    )  # 4.54-generated code: nothing to do
    patched = patch.apply(CACHE_4_56).source
    assert patch.apply(patched).status == "already-applied"
    tree = ast.parse(patched)
    shim = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.If))]

    class OldCache:  # < 4.56
        def __init__(self, *args, **kwargs):
            self.args = args

    class NewCache:  # >= 4.56
        def __init__(self, ddp_cache_data=None, config=None):
            self.config = config

    for cls, replaced in ((OldCache, True), (NewCache, False)):
        namespace = {"DynamicCache": cls}
        exec(compile(ast.Module(shim, type_ignores=[]), "shim", "exec"), namespace)
        assert (namespace["DynamicCache"] is not cls) is replaced
        cache = namespace["DynamicCache"](config="cfg")
        assert isinstance(cache, cls)


# --- the patched model under the installed transformers (own process and modules cache) -------------

LOAD_SCRIPT = r"""
import json, shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM

src, weights = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
config = AutoConfig.from_pretrained(src, trust_remote_code=True)
fresh = AutoModelForCausalLM.from_config(config, trust_remote_code=True, attn_implementation="eager").eval()
fresh.save_pretrained(weights)
for f in src.glob("*.py"):
    shutil.copy(f, weights)
ids = torch.tensor([[5, 17, 42, 99, 3, 7, 11]])
dim = config.head_dim
expected = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
out = {}
with torch.no_grad():
    reference = fresh(ids).logits
    model = AutoModelForCausalLM.from_pretrained(weights, trust_remote_code=True, attn_implementation="eager").eval()
    rotary = model.model.rotary_emb
    out["inv_freq_after_load"] = torch.equal(rotary.inv_freq, expected)
    out["logits_equal"] = torch.equal(model(ids).logits, reference)
    out["tied"] = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    bad = {"zeros": torch.zeros_like(expected), "garbage": torch.full_like(expected, 8192.0),
           "bf16": expected.to(torch.bfloat16)}
    for name, value in bad.items():
        if value.dtype == rotary.inv_freq.dtype:
            rotary.inv_freq.copy_(value)  # in place, as uninitialised memory would be
        else:
            rotary.register_buffer("inv_freq", value, persistent=False)  # as model.to(bfloat16) does
        logits = model(ids).logits
        out[name] = rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, expected)
        out[name + "_logits_equal"] = torch.equal(logits, reference)
    real_equal, compared = torch.equal, []
    torch.equal = lambda *a: compared.append(1) or real_equal(*a)
    for _ in range(3):
        model(ids)
    out["comparisons_when_unchanged"] = len(compared)
    rotary.inv_freq.data = torch.full_like(expected, 8192.0)  # new storage, same tensor object
    out["data_swap_logits_equal"] = torch.equal(model(ids).logits, reference)
    out["comparisons_after_data_swap"] = len(compared)
    torch.equal = real_equal
    with torch.inference_mode():
        rotary.register_buffer("inv_freq", torch.zeros_like(expected), persistent=False)
        out["inference_mode_logits_equal"] = torch.equal(model(ids).logits, reference)
        rotary.inv_freq.zero_()  # an inference tensor: no version counter, so compared every time
        out["inference_mode_inplace_logits_equal"] = torch.equal(model(ids).logits, reference)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda *a, **k: calls.append(sorted(k)) or real(*a, **k)
    sdpa = AutoModelForCausalLM.from_pretrained(weights, trust_remote_code=True, attn_implementation="sdpa").eval()
    out["sdpa_max_diff"] = float((sdpa(ids).logits - reference).abs().max())
    torch.nn.functional.scaled_dot_product_attention = real
    out["sdpa_calls"] = len(calls)
    out["sdpa_kwargs"] = sorted({k for call in calls for k in call})
    out["loss_finite"] = bool(torch.isfinite(model(ids, labels=ids).loss))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, patched_source: str) -> dict:
    """Build a model from the patched code, save it, load it back with from_pretrained, and probe it."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("patched-model")
    src = tmp / "opensci-patched"
    src.mkdir()
    shutil.copy(FIXTURE / "config.json", src)
    shutil.copy(FIXTURE / "configuration_opensci.py", src)
    (src / "modeling_opensci.py").write_text(patched_source)
    (tmp / "probe.py").write_text(LOAD_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHONPATH", "TRANSFORMERS_"))}
    env.update(HF_MODULES_CACHE=str(tmp / "modules"), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run(
        [sys.executable, str(tmp / "probe.py"), str(src), str(tmp / "weights")],
        cwd=tmp,  # not the repo: the patched code must not need opensci_patch
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["warnings"] = proc.stderr.count("opensci-patch: the rotary inv_freq buffer")
    return result


def test_patched_model_round_trips_through_from_pretrained(loaded: dict):
    assert loaded["logits_equal"]
    assert loaded["tied"]
    assert loaded["loss_finite"]


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


def test_sdpa_runs_without_enable_gqa_and_matches_eager(loaded: dict):
    assert loaded["sdpa_calls"] == 3  # one per layer
    assert "enable_gqa" not in loaded["sdpa_kwargs"]
    assert loaded["sdpa_max_diff"] < 1e-5


# --- tied_weights: the embedding accessors transformers < 4.54 ties through ----------------------------

TIED = """\
import torch
from torch import nn


class OsrModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 4)


class OsrForCausalLM(nn.Module):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config):
        super().__init__()
        self.model = OsrModel(config)
        self.lm_head = nn.Linear(4, 10, bias=False)
"""


def test_tied_weights_adds_the_accessors_a_generated_file_lacks():
    torch = pytest.importorskip("torch")
    outcome = by_name("tied_weights").apply(TIED, "modeling_osr.py")
    assert outcome.status == "applied"
    assert by_name("tied_weights").apply(outcome.source).status == "already-applied"
    namespace: dict = {}
    exec(compile(outcome.source, "modeling_osr.py", "exec"), namespace)
    lm = namespace["OsrForCausalLM"](None)
    assert lm.get_input_embeddings() is lm.model.embed_tokens
    assert lm.get_output_embeddings() is lm.lm_head
    other = torch.nn.Embedding(10, 4)
    lm.set_input_embeddings(other)
    lm.set_output_embeddings(torch.nn.Identity())
    assert lm.model.embed_tokens is other and isinstance(lm.lm_head, torch.nn.Identity)
    assert namespace["OsrForCausalLM"]._tied_weights_keys == {"lm_head.weight": "model.embed_tokens.weight"}


def test_tied_weights_keeps_accessors_the_class_defines(modeling_source: str):
    own = TIED + "\n    def get_output_embeddings(self):\n        return None\n"
    patched = by_name("tied_weights").apply(own).source
    tree = ast.parse(patched)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "OsrForCausalLM")
    names = [n.name for n in cls.body if isinstance(n, ast.FunctionDef)]
    assert names.count("get_output_embeddings") == 1 and "get_input_embeddings" in names
    shipped = by_name("tied_weights").apply(modeling_source).source  # defines all four itself
    assert "# opensci-patch: tied_weights (transformers < 4.54 ties" not in shipped
