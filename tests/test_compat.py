"""Feature probes and the TransformersKwargs back-fill, against the installed transformers."""

from __future__ import annotations

import typing

import pytest

transformers_utils = pytest.importorskip("transformers.utils")

from opensci_patch.measure import compat  # noqa: E402


def test_shim_backfills_missing_transformers_kwargs(monkeypatch):
    monkeypatch.delattr(transformers_utils, "TransformersKwargs", raising=False)
    assert not compat.has_transformers_kwargs()
    assert compat.install_transformers_kwargs_shim() is True
    shim = transformers_utils.TransformersKwargs
    assert typing.is_typeddict(shim)
    assert shim.__total__ is False
    assert compat.install_transformers_kwargs_shim() is False  # already there: left alone
    assert transformers_utils.TransformersKwargs is shim


def test_shim_leaves_an_existing_name_alone(monkeypatch):
    sentinel = type("Sentinel", (), {})
    monkeypatch.setattr(transformers_utils, "TransformersKwargs", sentinel, raising=False)
    assert compat.install_transformers_kwargs_shim() is False
    assert transformers_utils.TransformersKwargs is sentinel


def test_probes_agree_with_the_library():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    p = compat.probes()
    assert p["rope_init_default"] == ("default" in ROPE_INIT_FUNCTIONS)
    assert p["LossKwargs"] == hasattr(transformers_utils, "LossKwargs")
    assert p["dtype_keyword"] in ("dtype", "torch_dtype")
