"""rope_default: `ROPE_INIT_FUNCTIONS["default"]` is gone in transformers 5.x.

Detects: lookups `ROPE_INIT_FUNCTIONS[key]` (e.g. `self.rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]`).
Rewrites: `_opensci_default_rope_init if key == "default" else ROPE_INIT_FUNCTIONS[key]`, and
inlines `_opensci_default_rope_init`, a copy of 4.48's `_compute_default_rope_parameters`: the
same operations in the same order, so `inv_freq` is bit-identical on every release. Other rope
types still come from the installed transformers.
Verifies: every lookup is guarded and the function is defined at module level.

5.x moves `rope_theta` (and `partial_rotary_factor`) of a custom config into
`config.rope_parameters` (also exposed as `rope_scaling`); on 5.2 a custom config still has
the plain attribute too, but the inlined function falls back in that order in case a later
release drops it.
"""

from __future__ import annotations

from opensci_patch.rewrite.patches.lookup import GuardedLookup
from opensci_patch.rewrite.templates import section

NAME = "rope_default"
WHY = 'transformers 5.x has no ROPE_INIT_FUNCTIONS["default"]'

DEFINITION = section("lookups", "rope_default")  # templates/lookups.py

LOOKUP = GuardedLookup("ROPE_INIT_FUNCTIONS", "default", "_opensci_default_rope_init", DEFINITION, NAME, WHY)


PATCH = LOOKUP.as_patch(50, "inline the default RoPE init that transformers 5.x dropped from ROPE_INIT_FUNCTIONS")
