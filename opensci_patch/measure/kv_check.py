"""The KV-cache self-check: each decode step's logits with the cache against the same step without one.

A single forward proves nothing about generation: a forward that loses its cache (5.24 passes it
as `cache=`) gives the right first logits and wrong text from token 2. So each decode step's
logits (as `generate` saw them) are compared with a full forward over the prompt and the tokens
generated so far, with no cache. Needs no other release.
"""

from __future__ import annotations

from opensci_patch.measure.records import KVCheck

# max |step logits with the cache - the same step recomputed without one|.
# Measured on the shipped checkpoint (fp32 eager/SDPA: <= 1e-5; bf16: <= 0.13; a forward that drops
# its cache: >= 2 in every dtype), see docs/upstream.md.
KV_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.1}


def check_decode_steps(lm, tokenizer, sequence, prompt_len: int, steps: list, dtype: str) -> KVCheck:
    """Compare `steps` (the logits `generate` saw at each decode step, with the cache) with a no-cache forward
    over `sequence` (prompt and generated ids) up to that step; the first step off by more than the tolerance
    fails the check."""
    import torch

    new = sequence[prompt_len:].tolist()
    tolerance = KV_TOLERANCE[dtype]
    worst, first_bad, detail = 0.0, None, ""
    no_cache = _no_cache_logits(lm, sequence, prompt_len, len(steps))
    with torch.no_grad():
        for i, cached in enumerate(steps):
            full = no_cache(i)
            cached = cached.float().cpu()
            diff = float((cached - full).abs().max()) if bool(torch.isfinite(cached).all()) else float("inf")
            worst = max(worst, diff)
            chosen = new[i] if i < len(new) else int(cached.argmax())
            best = int(full.argmax())
            # a token counts as different only when the no-cache logits prefer another one by more than the tolerance
            token_bad = chosen != best and float(full[best] - full[chosen]) > tolerance
            if first_bad is None and (diff > tolerance or token_bad):
                first_bad = i
                got, want = tokenizer.decode([chosen]), tokenizer.decode([best])
                what = f"token {got!r} where the no-cache forward gives {want!r}; "
                detail = (
                    f"decode step {i}: "
                    + (what if token_bad else "")
                    + f"logits with the KV cache differ from the no-cache recomputation by {diff:.3g} "
                    f"(tolerance {tolerance:g} for {dtype})"
                )
    return KVCheck(
        ok=first_bad is None,
        tolerance=tolerance,
        max_abs_diff=worst,
        first_bad_step=first_bad,
        detail=detail or f"{len(steps)} decode steps agree with the no-cache recomputation (max diff {worst:.3g})",
    )


def _no_cache_logits(lm, sequence, prompt_len: int, n_steps: int):
    """Step i's no-cache logits (the last position of a forward over the prompt and the first i generated ids).

    One forward over the whole sequence gives every step's (a causal model's position p sees only positions <= p),
    instead of one forward per step: the check cost 70% of a capture (issue 27: four panels per release). A model
    that returns the last position only is run once per step, as before."""
    import torch

    with torch.no_grad():
        logits = lm(input_ids=sequence[None, : prompt_len + max(n_steps - 1, 0)], use_cache=False).logits[0]
    if logits.shape[0] == prompt_len + max(n_steps - 1, 0):
        return lambda i: logits[prompt_len - 1 + i].float().cpu()

    def one(i: int):
        with torch.no_grad():
            return lm(input_ids=sequence[None, : prompt_len + i], use_cache=False).logits[0, -1].float().cpu()

    return one

