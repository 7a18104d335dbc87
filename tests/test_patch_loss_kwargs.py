"""loss_kwargs: the `LossKwargs` base (gone in 5.x) dropped, and a `TransformersKwargs` fallback where it is missing."""

from __future__ import annotations

import ast

import pytest
from patch_sources import assert_patch


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


WHOLE_BEFORE = """\
from transformers.utils import LossKwargs


class KwargsForCausalLM(LossKwargs):
    pass
"""

WHOLE_AFTER = '''\
# opensci-patch: loss_kwargs (no transformers release has both LossKwargs and TransformersKwargs)
try:
    from transformers.utils import TransformersKwargs
except ImportError:  # transformers <= 4.53
    from typing import TypedDict

    class TransformersKwargs(TypedDict, total=False):
        """Empty stand-in for releases without it: it only types `**kwargs`."""


class KwargsForCausalLM(TransformersKwargs):
    pass
'''


def test_whole_output_the_import_becomes_the_guarded_one_and_the_base_is_renamed():
    assert_patch("loss_kwargs", WHOLE_BEFORE, WHOLE_AFTER)
