"""sdpa_gqa: pin the SDPA attention path to what transformers 4.48 did.

From 4.54 the transformers SDPA wrapper passes `enable_gqa=True` to
`torch.nn.functional.scaled_dot_product_attention` (on 4.54-5.2 whenever torch >= 2.5 and there
is no mask, even for plain multi-head attention), which can select a different kernel than 4.x.

Detects: lookups `ALL_ATTENTION_FUNCTIONS[key]` (or `ALL_ATTENTION_FUNCTIONS.get_interface(key, ...)`).
Rewrites: `_opensci_sdpa_attention_forward if key == "sdpa" else <lookup>`, and inlines
`_opensci_sdpa_attention_forward`, a copy of 4.48's `sdpa_attention_forward` (repeat k/v, slice
the mask, contiguous inputs, no `enable_gqa`). Eager and flash attention are unchanged.
Verifies: every lookup is guarded and the function is defined at module level.
"""

from __future__ import annotations

from opensci_patch.rewrite.patches.lookup import GuardedLookup
from opensci_patch.rewrite.templates import section

NAME = "sdpa_gqa"
WHY = "transformers >= 4.54 passes enable_gqa=True to torch SDPA"

DEFINITION = section("lookups", "sdpa_gqa")  # templates/lookups.py

LOOKUP = GuardedLookup(
    "ALL_ATTENTION_FUNCTIONS", "sdpa", "_opensci_sdpa_attention_forward", DEFINITION, NAME, WHY, ("get_interface",)
)


PATCH = LOOKUP.as_patch(70, "route 'sdpa' attention through an inlined 4.48-style SDPA call (no enable_gqa)")
