"""The contract every source patch keeps: it is registered in its order, applies to the fixture, verifies, is
idempotent, refuses what it cannot read, finds its target by structure, and all patches together give a model that
loads and computes the right thing under the installed transformers.

What each patch's rewrite produces is tested in its own file, tests/test_patch_<name>.py; sources several files
share are in tests/patch_sources.py."""

from __future__ import annotations

import pytest
from patch_sources import (
    CONVERTED_CONFIG,
    FIXTURE,
    GENERATED,
    LEGACY_CACHE_43,
    LLAMA_STYLE,
    MAX_LENGTH_43,
    NO_POST_INIT,
    OVERRIDE_43,
    OWN_NAMES_CONFIG,
    PEP604,
    ROPE_SCALING_43,
    VENDORED,
    class_attribute,
)

from opensci_patch._util.errors import PatchError
from opensci_patch.rewrite.patches import PATCHES, apply_patches, by_name, default_patches, select

NAMES = [p.name for p in PATCHES]
# the patches whose construct the shipped, hand-written file does not have
# (remote_code applies: its config comes `from .configuration_opensci`, as every checkpoint-module config does)
NOT_IN_SHIPPED = ("moved_helpers", "auto_docstring_args", "rope_theta", "union_annotations", "relative_imports",
                  "config_params", "legacy_cache", "generation_call", "config_aliases",
                  "rope_scaling", "generation_defaults")  # fmt: skip

# patch -> (text in the fixture, what it becomes): a target the patch must refuse to guess at
MANGLED = {
    "loss_kwargs": ("import LossKwargs, TransformersKwargs", "import LossKwargs as LK, TransformersKwargs"),
    "rope_default": ("= ROPE_INIT_FUNCTIONS[self.rope_type]", "= ROPE_INIT_FUNCTIONS.get(self.rope_type)"),
    "tied_weights": ("self.model = OpensciModel(config)", "self.model = build_base_model(config)"),
    "sdpa_gqa": (
        "ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]",
        "ALL_ATTENTION_FUNCTIONS.get(self.config._attn_implementation)",
    ),
    "inv_freq_guard": ('self.register_buffer("inv_freq"', 'nn.Module.register_buffer(self, "inv_freq"'),
    "init_weights": ("module.bias.data.zero_()", "module.bias.data = torch.zeros_like(module.bias)"),
    "moved_helpers": ("import create_causal_mask, create_sliding", "import create_causal_mask as ccm, create_sliding"),
    "hub_kernels": (
        "class OpensciPreTrainedModel(PreTrainedModel):\n",
        "class OpensciPreTrainedModel(PreTrainedModel):\n    @classmethod\n    def from_pretrained(cls, *a, **k):\n"
        "        return super().from_pretrained(*a, **k)\n\n",
    ),
    "auto_docstring_args": (
        "cache_position=None, past_key_values=None):\n",
        'cache_position=None, past_key_values=None):\n        """Summary."""\n',
    ),
    "rope_theta": ("self.rope_theta = config.rope_theta", 'self.rope_theta = getattr(config, "rope_theta", 1e4)'),
    "post_init": (
        "    def __init__(self, config):\n        super().__init__(config)\n        self.model",
        "    def __init__(self, config): super().__init__(config); self.model",
    ),
    "remote_code": (
        "    config_class = LlamaConfig\n",
        "    config_class = LlamaConfig\n    is_remote_code = classmethod(lambda cls: False)\n",
    ),
    "union_annotations": ("from typing import Optional\n", "from typing import Optional\nfrom mylib import Union\n"),
    "relative_imports": ("from ...activations import ACT2FN", "from ....activations import ACT2FN"),
    "config_params": ("        super().__init__(\n", "        PretrainedConfig.__init__(\n            self,\n"),
    "rope_scaling": ("if config.rope_scaling is None:", 'if getattr(config, "rope_scaling", None) is None:'),
    "legacy_cache": ("cache.get_usable_length(n)", "cache.get_usable_length.__call__(n)"),
    "generation_call": (
        "super()._update_model_kwargs_for_generation(",
        "(lambda f: f)(super()._update_model_kwargs_for_generation)(",
    ),
    "config_aliases": ('attribute_map = {"hidden_size": "n_embd"}', "attribute_map = dict(hidden_size='n_embd')"),
    "generation_defaults": ("self.limit = config.max_length", 'self.limit = getattr(config, "max_length")'),
    "cache_kwarg": (
        "        logits_to_keep: Union[int, torch.Tensor] = 0,\n",
        "        logits_to_keep: Union[int, torch.Tensor] = 0,\n        cache: Optional[Cache] = None,\n",
    ),
}


def target_source(name: str, modeling_source: str) -> str:
    """The source a patch has a target in: the shipped file, or for moved_helpers and rope_theta a small one."""
    small = {"moved_helpers": GENERATED, "auto_docstring_args": GENERATED, "rope_theta": LLAMA_STYLE,
             "post_init": NO_POST_INIT, "remote_code": NO_POST_INIT, "union_annotations": PEP604,
             "relative_imports": VENDORED, "config_params": CONVERTED_CONFIG,
             "rope_scaling": ROPE_SCALING_43, "legacy_cache": LEGACY_CACHE_43, "generation_call": OVERRIDE_43,
             "config_aliases": OWN_NAMES_CONFIG, "generation_defaults": MAX_LENGTH_43}  # fmt: skip
    return small.get(name, modeling_source)


# --- the contract, for every patch ----------------------------------------------------------------


def test_registry_order_and_defaults():
    assert NAMES == [
        "relative_imports",
        "loss_kwargs",
        "union_annotations",
        "moved_helpers",
        "cache_kwarg",
        "legacy_cache",
        "generation_call",
        "auto_docstring_args",
        "config_aliases",
        "rope_theta",
        "rope_scaling",
        "generation_defaults",
        "rope_default",
        "tied_weights",
        "remote_code",
        "post_init",
        "hub_kernels",
        "config_params",
        "sdpa_gqa",
        "inv_freq_guard",
        "init_weights",
    ]
    assert [p.name for p in default_patches()] == NAMES[:20]
    assert [p.name for p in select(["init_weights"])] == NAMES
    with pytest.raises(PatchError, match="unknown patch 'nope'"):
        select(["nope"])


def test_a_new_patch_module_is_found_by_itself_in_its_order(tmp_path, monkeypatch):
    """Adding a patch is one new module in opensci_patch/patches: the registry discovers and orders it."""
    import opensci_patch.rewrite.patches as registry

    package = tmp_path / "fake_patches"
    package.mkdir()
    for name, order in (("zeta", 5), ("alpha", 95), ("not_a_patch", None)):
        body = (
            ""
            if order is None
            else (
                "from opensci_patch.rewrite.patches.base import Patch, State\n"
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
    assert statuses == {n: "not-applicable" if n in NOT_IN_SHIPPED else "already-applied" for n in NAMES}


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
    expected = {p.name: "already-applied" if p.name == "post_init" else "applied" for p in default_patches()}
    assert statuses == expected | {name: "not-applicable" for name in NOT_IN_SHIPPED}
    assert class_attribute(patched, "OsrForCausalLM", "_tied_weights_keys") == {
        "lm_head.weight": "transformer.wte.weight"
    }
    assert "isinstance(module, OsrRotaryEmbedding)" in patched
    assert "from transformers.utils import (\n    logging,\n)" in patched
    assert apply_patches(patched, default_patches())[0] == patched


def test_patched_model_round_trips_through_from_pretrained(loaded: dict):
    """Every patch together: the patched model saves, loads back and gives the fresh model's logits."""
    assert loaded["logits_equal"]
    assert loaded["tied"]
    assert loaded["loss_finite"]
