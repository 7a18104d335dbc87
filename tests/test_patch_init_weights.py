"""init_weights: `_init_weights` through `nn.init` instead of `.data`, so the per-tensor guard of 5.0/5.1 keeps the
loaded weights."""

from __future__ import annotations

import ast
from types import SimpleNamespace

import pytest
from patch_sources import assert_patch

from opensci_patch.rewrite.patches import by_name


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


WHOLE_BEFORE = """\
from torch import nn


def _init_weights(self, module):
    module.weight.data.normal_(mean=0.0, std=0.02)
    if module.bias is not None:
        module.bias.data.zero_()
    if isinstance(module, nn.Embedding):
        module.weight.data[module.padding_idx].zero_()
"""

# one marker, above the first statement changed
WHOLE_AFTER = """\
from torch import nn


def _init_weights(self, module):
    # opensci-patch: init_weights (transformers 5.0/5.1 re-run _init_weights after loading; .data bypasses their guard)
    nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding):
        if not getattr(module.weight, "_is_hf_initialized", False):
            nn.init.zeros_(module.weight[module.padding_idx])
"""


def test_whole_output_each_data_call_becomes_an_nn_init_call():
    assert_patch("init_weights", WHOLE_BEFORE, WHOLE_AFTER)
