"""What "matches the reference" means: three rules, side by side, each named for what it promises.

- `bit_identical(rec, ref)` (the matrix report): the same first logits (sha256), decode steps and
  greedy tokens as the reference *cell* (same torch build, device, dtype, attention), and nothing
  the report shows contradicting that. The cross-version promise: another release, the same bits.
- `same_tokens_within(tolerance)(rec, ref)` (`opensci-patch demo`): the same greedy tokens and
  top-k token ids as the shipped reference *record*, top-k logits within `tolerance`. Another CPU's
  SIMD path or another torch may round differently while being right, so bits are not required.
- `within_fp64_tolerance(rec)` (bisect): the record's last-position logits agree with the
  independent fp64 forward (`opensci_patch.measure.reference`) within the dtype's noise. No other
  release is assumed right.

Each returns (matches, one line saying why), the line in the words its caller has always shown.
Standard library only.
"""

from __future__ import annotations

from collections.abc import Callable

from opensci_patch.measure.records import OK, Record, Status

# How far from the fp64 reference a dtype's result may be and still agree with it; diagnose's stages use the
# same thresholds (a stage diverges when max |A - B| > tol * (1 + max |ref|)).
TOLERANCE = {"float64": 1e-4, "float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
UNKNOWN_DTYPE_TOLERANCE = 1e-2


def failure(rec: Record) -> str:
    """Why a record that did not run to the end failed, in one line."""
    if rec.status == Status.GENERATE_MISMATCH:
        detail = rec.generation.kv_check.detail if rec.generation else ""
        return f"generate-mismatch: {detail or 'KV-cache decoding disagrees with the no-cache recomputation'}"
    err = rec.error
    return f"{rec.status}: {err.type}: {err.message}".rstrip(": ") if err else str(rec.status)


def first_step_difference(rec: Record, ref: Record) -> str | None:
    """None when the decode steps' logits are bit-identical to the reference's, else what differs.

    Step 0 (generate's forward over the prompt) is not compared bit for bit: its logits are the
    prompt forward's, already compared as `logits_sha256`, but 5.x `generate` passes
    `logits_to_keep=1` and 4.x does not, so the head's matmul runs over one row instead of the whole
    prompt and rounds differently (measured: 5.2.0 vs 4.48.0 patched fp32 eager, max diff 2.9e-6,
    steps 1-19 bit-identical). A wrong step 0 still shows in the KV self-check (`generate-mismatch`).
    """
    mine = rec.generation.step_logits_sha256 if rec.generation else ()
    theirs = ref.generation.step_logits_sha256 if ref.generation else ()
    for step in range(1, min(len(mine), len(theirs))):
        if mine[step] != theirs[step]:
            return f"decode step {step} logits differ from the reference cell"
    if len(mine) != len(theirs):
        return f"{len(mine)} decode steps recorded, the reference cell has {len(theirs)}"
    return None


def shown_values_differ(rec: Record, ref: Record) -> str | None:
    """What the report shows of a record that its `logits_sha256` cannot vouch for, compared with the
    reference cell's: equal hashes mean bit-identical logits, so the target logit and rank, the top-k ids
    and logits, the fp64 gap (the same deterministic fp64 forward) and the greedy text must be equal too.
    A record whose values differ while its hash matches was edited or is corrupt; it never passes."""

    def target(r: Record):
        return (r.target.id, r.target.logit, r.target.rank) if r.target else (None, None, None)

    checks = [
        ("target logit and rank", target(rec), target(ref)),
        ("top-k logits", [(t.id, t.logit) for t in rec.topk], [(t.id, t.logit) for t in ref.topk]),
        ("greedy text", rec.generation and rec.generation.text, ref.generation and ref.generation.text),
    ]
    if rec.reference and ref.reference:
        checks.append(("fp64 gap", rec.reference.max_abs_diff, ref.reference.max_abs_diff))
    for what, a, b in checks:
        if a != b:
            return f"record contradicts itself: logits_sha256 equals the reference cell's but its {what} differs"
    return None


def bit_identical(rec: Record, ref: Record | None) -> tuple[bool, str]:
    """Ran ok, and its logits, decode steps and greedy tokens are bit for bit the reference cell's."""
    if rec.status != OK:
        return False, failure(rec)
    if ref is None:
        return False, "no reference cell to compare with"
    if rec.logits_sha256 != ref.logits_sha256:
        return False, "logits differ from the reference cell"
    why = shown_values_differ(rec, ref) or first_step_difference(rec, ref)
    if why:
        return False, why
    if rec.generation.ids != ref.generation.ids:
        return False, "greedy generation differs from the reference cell"
    return True, ""


def same_tokens_within(tolerance: float) -> Callable[[Record, Record], tuple[bool, str]]:
    """The rule: ran ok (KV-cache self-check passed), the same greedy tokens and top-k token ids in the same
    order as the reference record, and their logits within `tolerance`; bit identity is said, not required."""

    def rule(rec: Record, ref: Record) -> tuple[bool, str]:
        if rec.status != OK:
            return False, f"status {rec.status} ({rec.error.message if rec.error else ''})"
        ids, ref_ids = list(rec.generation.ids), list(ref.generation.ids)
        if ids != ref_ids:
            step = next(
                (i for i, (a, b) in enumerate(zip(ids, ref_ids, strict=False)) if a != b), min(len(ids), len(ref_ids))
            )
            return False, f"greedy token {step + 1} differs ({ids[step : step + 3]} vs {ref_ids[step : step + 3]})"
        top, ref_top = [t.id for t in rec.topk], [t.id for t in ref.topk]
        if top != ref_top:
            return False, f"top-{len(ref_top)} tokens differ ({top} vs {ref_top})"
        diff = max(abs(a.logit - b.logit) for a, b in zip(rec.topk, ref.topk, strict=True))
        if diff > tolerance:
            return False, f"top-{len(ref_top)} logits differ by {diff:.3g} (> {tolerance:g})"
        exact = rec.logits_sha256 == ref.logits_sha256
        how = "bit-identical logits" if exact else f"logits within {diff:.2g} (not bit-identical: another CPU or torch)"
        return True, f"{how}, the same {len(ids)} greedy tokens"

    return rule


def within_fp64_tolerance(rec: Record) -> tuple[bool, str]:
    """Ran ok, and max |logit - fp64 reference logit| is within the dtype's `TOLERANCE`."""
    if rec.status != OK:
        err = rec.error
        return False, f"{rec.status}: {err.type if err else ''} {err.message if err else ''}".strip()
    if not rec.reference:
        return False, "no fp64 reference in the record (checkpoint too large? use a smaller one)"
    if not rec.reference.applicable:
        return False, f"fp64 reference {rec.reference.not_applicable}"
    tol = TOLERANCE[rec.settings["dtype"]]
    gap = rec.reference.max_abs_diff
    return gap <= tol, f"max |logit - fp64 ref| = {gap:.3g} (tolerance {tol:g})"
