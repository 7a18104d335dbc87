"""apply_patches: one parse per file, every patch on that tree, one re-parse of the result to verify it.

What it returns and raises is what the patches give applied one by one (`Patch.apply`, each parsing its
predecessor's output and re-parsing its own), which is the contract in `patches/base.py`.
"""

from __future__ import annotations

import operator

import libcst as cst
import pytest
from patch_sources import assert_patch

from opensci_patch._util.errors import PatchError
from opensci_patch.rewrite.patches import (
    PATCHES,
    Patch,
    State,
    apply_patches,
    by_name,
    default_patches,
    select,
    tree_walk,
)


def one_by_one(source: str, patches, filename: str = "<source>"):
    statuses = {}
    for patch in patches:
        try:
            outcome = patch.apply(source, filename)
        except PatchError as exc:
            if "cannot rewrite" not in str(exc):
                raise
            statuses[patch.name] = "refused"  # what it does not know: the file as it was, the next patch goes on
            continue
        statuses[patch.name] = outcome.status
        source = outcome.source
    return source, statuses


def test_a_file_is_parsed_once_and_its_output_once(modeling_source: str, monkeypatch):
    apply_patches(modeling_source, PATCHES)  # the inserted code's templates are parsed once per process
    parsed: list[str] = []
    real = cst.parse_module
    monkeypatch.setattr(cst, "parse_module", lambda text, *a, **k: parsed.append(text) or real(text, *a, **k))
    out, statuses = apply_patches(modeling_source, PATCHES, "modeling_opensci.py")
    assert list(statuses.values()).count("applied") >= 5
    assert len(parsed) == 2 and parsed[0] == modeling_source and parsed[1] == out


def test_the_result_is_that_of_the_patches_one_by_one(modeling_source: str, patched_source: str):
    for source in (modeling_source, patched_source, modeling_source.replace("Opensci", "Osr")):
        assert apply_patches(source, PATCHES, "m.py") == one_by_one(source, PATCHES, "m.py")


def test_an_error_is_the_one_the_patch_applied_alone_raises(modeling_source: str):
    """An unparsable file stops the run: the first patch in order (relative_imports) says so, alone or together."""
    source = modeling_source.replace("class OpensciForCausalLM(", "def broken(:\nclass OpensciForCausalLM(", 1)
    with pytest.raises(PatchError) as alone:
        one_by_one(source, default_patches(), "modeling_x.py")
    with pytest.raises(PatchError) as together:
        apply_patches(source, default_patches(), "modeling_x.py")
    assert str(together.value) == str(alone.value)
    assert "patch 'relative_imports'" in str(together.value) and "modeling_x.py" in str(together.value)


def test_a_patch_that_does_not_know_its_target_is_refused_and_the_others_still_apply(modeling_source: str):
    source = modeling_source.replace(
        "import LossKwargs, TransformersKwargs,", "import LossKwargs as LK, TransformersKwargs,", 1
    )
    with pytest.raises(PatchError, match="patch 'loss_kwargs'") as alone:
        by_name("loss_kwargs").apply(source, "modeling_x.py")
    refused: dict[str, list[str]] = {}
    out, statuses = apply_patches(source, default_patches(), "modeling_x.py", refused)
    assert statuses["loss_kwargs"] == "refused"
    assert refused == {"loss_kwargs": [str(alone.value.__cause__)]}
    unchanged = apply_patches(modeling_source, default_patches())[1]
    applied = [n for n, s in unchanged.items() if s == "applied" and n != "loss_kwargs"]
    assert [n for n, s in statuses.items() if s == "applied"] == applied
    assert "import LossKwargs as LK" in out and "self._opensci_check_inv_freq()" in out
    # the same result one patch at a time (apply_all's fallback path)
    assert apply_patches(source, default_patches(), "m.py") == one_by_one(source, default_patches(), "m.py")


def test_a_rewrite_that_does_not_verify_is_an_error_naming_the_patch():
    stubborn = Patch("stubborn", 999, "never done", True, inspect=lambda tree: State.NEEDED, rewrite=lambda tree: tree)
    with pytest.raises(PatchError, match=r"patch 'stubborn' did not verify on modeling_x\.py"):
        apply_patches("import torch\n", [*select(), stubborn], "modeling_x.py")


class _Log(cst.CSTVisitor):
    """Records its calls; skips the bodies of `forward` (a visit_ returning False)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, cst.CSTNode]] = []

    def visit_Name(self, node: cst.Name) -> None:
        self.calls.append(("visit", node))

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        self.calls.append(("visit", node))
        return node.name.value != "forward"

    def leave_ClassDef(self, node: cst.ClassDef) -> None:
        self.calls.append(("leave", node))


class _All(cst.CSTVisitor):
    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[cst.CSTNode] = []

    def on_visit(self, node: cst.CSTNode) -> bool:
        self.nodes.append(node)
        return True


def test_walk_and_find_all_see_the_nodes_libcst_visits_in_its_order(modeling_source: str, patched_source: str):
    from opensci_patch.rewrite.patches.tree_walk import find_all, indexed, walk

    for source in (modeling_source, patched_source):
        tree = cst.parse_module(source)
        everything = _All()
        tree.visit(everything)
        expected = _Log()
        tree.visit(expected)
        with indexed():
            got = _Log()
            walk(tree, got)
            found = find_all(tree, cst.CSTNode)
            inner = find_all(tree.body[-1], cst.Name)  # from the index: a slice of the module's walk
        assert len(found) == len(everything.nodes) > 5000 and all(map(operator.is_, found, everything.nodes))
        assert [(k, id(n)) for k, n in got.calls] == [(k, id(n)) for k, n in expected.calls]
        assert len(expected.calls) > 500
        assert [id(n) for n in inner] == [id(n) for n in find_all(tree.body[-1], cst.Name)]  # outside the index
        assert tree_walk._local.index is None  # nothing kept once indexed() ends


def test_threads_patching_at_once_each_get_the_one_by_one_result(modeling_source: str, patched_source: str):
    from concurrent.futures import ThreadPoolExecutor

    want = {s: apply_patches(s, PATCHES) for s in (modeling_source, patched_source)}
    with ThreadPoolExecutor(2) as pool:
        sources = [modeling_source, modeling_source, patched_source]
        got = list(pool.map(lambda s: (s, apply_patches(s, PATCHES)), sources))
    assert all(result == want[source] for source, result in got)


WHOLE_BEFORE = """\
import torch


class TinyModel(torch.nn.Module):
    _tied_weights_keys = []

    def forward(self, x: torch.Tensor | None, past_key_values=None):
        return x
"""

WHOLE_AFTER = """\
# opensci-patch: union_annotations (transformers 4.57 @auto_docstring cannot read X | Y annotations)
from typing import Union
import torch


class TinyModel(torch.nn.Module):
    # opensci-patch: tied_weights (transformers 5.x needs {target: source})
    _tied_weights_keys = {}

    def forward(self, x: Union[torch.Tensor, None], past_key_values=None, *, cache=None):
        # opensci-patch: cache_kwarg (transformers 5.24 passes the KV cache as cache=)
        if cache is not None:
            if past_key_values is not None and past_key_values is not cache:
                raise ValueError("got one KV cache as `cache` and another as `past_key_values`: pass only one")
            past_key_values = cache
        return x
"""


def test_whole_output_of_the_default_patches_on_a_file_three_of_them_change():
    applied = {"cache_kwarg": "applied", "tied_weights": "applied", "union_annotations": "applied"}
    assert_patch(default_patches(), WHOLE_BEFORE, WHOLE_AFTER, status=applied)
