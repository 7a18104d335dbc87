"""patches/lookup.py: the guard rewrite must not depend on the identity of objects it lets die."""

from __future__ import annotations

import gc

import libcst as cst

from opensci_patch.rewrite.patches import rope_default, sdpa_gqa
from opensci_patch.rewrite.patches.lookup import _Guard

HEADER = """\
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
"""


def _many_lookups_then_parenthesised_code(n: int) -> str:
    """Guarded assignments (whose parentheses the guard drops) interleaved with parenthesised multi-line values."""
    parts = [HEADER]
    for i in range(n):
        parts.append(
            f"\n\ndef f{i}(self, kind):\n"
            f"    fn = ROPE_INIT_FUNCTIONS[kind]\n"
            f"    attn = ALL_ATTENTION_FUNCTIONS[self.impl]\n"
            f"    total = (\n        kind\n        + {i}\n    )\n"
            f"    other = (\n        attn if total else fn\n    )\n"
            f"    return (\n        total,\n        other,\n    )\n"
        )
    return "".join(parts)


def test_dropping_the_guards_parentheses_never_hits_a_later_node_that_reuses_freed_memory():
    """Each guard made and then replaced is freed; CPython hands its memory to the next node of that size.

    Keyed on `id()` of the dead guard, that later (parenthesised, multi-line) node lost its parentheses too.
    """
    guard = _Guard(rope_default.LOOKUP)
    lookup = cst.parse_expression("ROPE_INIT_FUNCTIONS[kind]")
    for _ in range(50):
        made = guard._wrap(lookup, lookup)
        assert isinstance(made, cst.IfExp) and made.lpar  # a new guard, with its parentheses
        unparenthesised = guard._unparen(made)
        assert not unparenthesised.lpar  # the guard's own parentheses go when it is a plain value
        del made, unparenthesised
        gc.collect()
        # the next nodes of the same class get the freed memory (CPython reuses it at once)
        fresh = [
            cst.IfExp(cst.Name("a"), cst.Name("b"), cst.Name(f"c{i}"), lpar=[cst.LeftParen()], rpar=[cst.RightParen()])
            for i in range(20)
        ]
        assert all(guard._unparen(node) is node for node in fresh)


def test_repeated_rewrites_of_a_file_full_of_parenthesised_expressions_always_parse():
    source = _many_lookups_then_parenthesised_code(40)
    for _ in range(15):
        tree = cst.parse_module(source)
        for lookup in (rope_default.LOOKUP, sdpa_gqa.LOOKUP):
            tree = lookup.rewrite(tree)
        out = tree.code
        compile(out, "<rewritten>", "exec")  # parses, and every multi-line value kept its parentheses
        assert out.count("    total = (\n") == 40
        assert out.count("    other = (\n") == 40
        assert out.count("    return (\n") == 40
