"""The named root-cause checks, as one registry: adding a check is one new `Check` entry in `CHECKS`.

A check reads the evidence of a comparison (both probes' recorded facts, the stage rows, the first
divergence) and returns one result per side or one for both: `{"name", "side", "fired",
"evidence", ...}`. Its `explains` says at which first-divergence stages a fired check counts as
the likely cause in the verdict: `ANY_STAGE`, a set of stage names, or `NO_STAGE` for checks that
describe the divergence itself (which side is off from fp64, rounding or bug) and are never a
cause. A check whose `run` is None is run by the driver (it needs probes of its own).

Importable with the standard library only (the driver's verdict reads `explains`); the checks
import torch when they run, inside an env.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opensci_patch.diagnose.stages import (
    ROPE_STAGES,
    TOLERANCE,
    exceeds,
    fmt,
    load_stage,
    ratio,
    side_verdict,
    threshold,
    where,
)

ANY_STAGE = None
NO_STAGE: frozenset[str] = frozenset()


@dataclass(frozen=True)
class SideEvidence:
    """What one side's probe recorded: its dir, model info, stage index, buffers and config."""

    label: str
    dir: Path
    info: dict
    dtype: str
    index: dict
    buffers: dict
    cfg: dict


@dataclass(frozen=True)
class Evidence:
    labels: tuple[str, str]
    sides: tuple[SideEvidence, SideEvidence]
    reference: dict | None  # the fp64 reference's stage index, when it ran
    rows: list[dict]  # per stage, in forward order (compare._compare_stages)
    first: dict | None  # the first diverging row


@dataclass(frozen=True)
class Check:
    name: str
    explains: frozenset[str] | None  # ANY_STAGE, NO_STAGE or the stages it can explain
    run: Callable[[Evidence], list[dict]] | None  # None: run by the driver


def result(name: str, side: str | None, fired: bool, evidence: str, **extra: Any) -> dict:
    return {"name": name, "side": side, "fired": fired, "evidence": evidence, **extra}


def per_side(check: Callable[[Evidence, SideEvidence], dict | None]) -> Callable[[Evidence], list[dict]]:
    """A check of one side, run for A then B (None: nothing to say for that side)."""
    return lambda ev: [r for side in ev.sides if (r := check(ev, side)) is not None]


# ---------------------------------------------------------------------------------------------
# the checks


def input_ids(ev: Evidence) -> list[dict]:
    a, b = (s.index["input_ids"] for s in ev.sides)
    same = a == b
    text = (
        f"both tokenize the prompt to {len(a)} tokens {a}"
        if same
        else f"the tokenizers disagree: {ev.labels[0]} {a}, {ev.labels[1]} {b}"
    )
    if ev.reference is not None and ev.reference["input_ids"] != a:
        text += f"; the reference ran on {ev.reference['input_ids']}"
    return [result("input_ids", None, not same, text)]


def weights_match_checkpoint(_ev: Evidence, side: SideEvidence) -> dict:
    weights = side.info.get("weights_check") or {}
    label = side.label
    if not weights.get("n_differ"):
        return result(
            "weights_match_checkpoint",
            label,
            False,
            f"all {weights.get('checked', 0)} checkpoint tensors loaded unchanged in {label}",
        )
    names = ", ".join(x["name"] for x in weights["differ"][:4])
    return result(
        "weights_match_checkpoint",
        label,
        True,
        f"{weights['n_differ']} of {weights['checked']} loaded tensors differ from the checkpoint in "
        f"{label} (e.g. {names}): loading replaced them (e.g. _init_weights re-run after "
        f"loading, as transformers 5.0/5.1 do: hotfix --with init_weights)",
        differ=weights["differ"][:10],
    )


def buffers_finite(_ev: Evidence, side: SideEvidence) -> dict:
    buffers = side.buffers["buffers"]
    bad = [b for b in buffers if b.get("finite") is False or (b.get("all_zero") and not b.get("persistent"))]
    if not bad:
        text = f"{len(buffers)} buffer(s) finite, no non-persistent buffer all zero in {side.label}"
    else:
        text = "; ".join(
            f"{b['name']} ({'non-finite' if b.get('finite') is False else 'all zero'}, "
            f"{'persistent' if b['persistent'] else 'non-persistent'})"
            for b in bad
        )
        text += f" in {side.label} at the first forward"
    return result("buffers_finite", side.label, bool(bad), text)


def inv_freq_checks(label: str, rotary: dict, buffers: list[dict], cfg: dict) -> tuple[dict, dict]:
    """inv_freq as the forward used it, against 1/theta^(2i/d) recomputed in fp64; and its dtype.

    Compared with recomputed values, never with zero: the memory 5.x leaves in inv_freq is often
    non-zero garbage.
    """
    import torch

    from opensci_patch.diagnose import fp64

    used = rotary.get("after_call") or rotary.get("at_call")
    persistent = next((b["persistent"] for b in buffers if b["name"].endswith(".inv_freq")), None)
    hint = (
        ": a non-persistent buffer (not in the checkpoint) that loading left uninitialised; recompute it in the "
        "model's _init_weights (hotfix patch inv_freq_guard)"
        if persistent is False
        else ""
    )
    if not used or "values" not in used:
        why = "no inv_freq recorded (no rotary module, or too large to store)"
        return (
            result("inv_freq_values", label, False, why, skipped=True),
            result("inv_freq_dtype", label, False, why, skipped=True),
        )
    expected = fp64.expected_inv_freq(cfg)
    seen = torch.tensor(used["values"], dtype=torch.float64)
    eps = torch.finfo(getattr(torch, used["dtype"])).eps if used["dtype"] in TOLERANCE else 1e-3
    dim = fp64.rotary_dim(cfg)
    replaced = ""
    at_call = rotary.get("at_call")
    if at_call and at_call.get("values") is not None and at_call["values"] != used["values"]:
        replaced = f" (at call: {describe_inv_freq(at_call, expected, label)}; the model replaced it inside forward)"
    if seen.shape != expected.shape:
        text = (
            f"inv_freq in {label} has {seen.numel()} entries, expected {expected.numel()} "
            f"(head_dim {fp64.head_dim(cfg)} * partial_rotary_factor {cfg.get('partial_rotary_factor', 1.0)}"
            f" = rotary dim {dim}, / 2)"
        )
        values = result("inv_freq_values", label, True, text + replaced)
    else:
        diff = (seen - expected).abs()
        ok = bool(torch.isfinite(seen).all()) and bool((diff <= 16 * eps * expected.abs()).all())
        text = (
            f"inv_freq in {label} matches 1/theta^(2i/{dim}) to {used['dtype']} precision "
            f"(max |diff| {float(diff.max()):.1e})"
            if ok
            else describe_inv_freq(used, expected, label) + hint
        )
        values = result(
            "inv_freq_values",
            label,
            not ok,
            text + replaced,
            max_abs_diff=float(diff.nan_to_num(math.inf).max()),
            seen=used["values"][:8],
            expected=expected.tolist()[:8],
        )
    low = used["dtype"] in ("bfloat16", "float16")
    text = (
        f"inv_freq is {used['dtype']} in {label}: downcast from float32, so RoPE angles pos * inv_freq lose "
        f"precision at positions > 0"
        if low
        else f"inv_freq is {used['dtype']} in {label}"
    )
    if at_call and at_call.get("dtype") != used["dtype"]:
        text += f" (at call it was {at_call['dtype']}; the model replaced it inside forward)"
    return values, result("inv_freq_dtype", label, low, text)


def describe_inv_freq(summary: dict, expected: Any, label: str) -> str:
    """'inv_freq all zero in B', 'inv_freq holds garbage in B (...)': what a user reads first."""
    import torch

    vals = summary.get("values")
    if vals is None:
        return f"inv_freq in {label} is {summary.get('dtype')}; values not stored"
    seen = torch.tensor(vals, dtype=torch.float64)
    if summary.get("all_zero"):
        return (
            f"inv_freq all zero in {label} (expected {expected.numel()} values from {float(expected[0]):.3g} to "
            f"{float(expected[-1]):.3g})"
        )
    if not bool(torch.isfinite(seen).all()):
        return f"inv_freq holds non-finite values in {label}"
    if seen.shape != expected.shape:
        return f"inv_freq has {seen.numel()} entries in {label}, expected {expected.numel()}"
    d = float((seen - expected).abs().max())
    shown = ", ".join(f"{v:.3g}" for v in vals[:4])
    return f"inv_freq holds garbage in {label} (max |diff| {d:.2e} from the expected values; seen {shown}, ...)"


def _inv_freq(side: SideEvidence) -> tuple[dict, dict]:
    return inv_freq_checks(side.label, side.buffers.get("rotary") or {}, side.buffers["buffers"], side.cfg)


def rope_dims(_ev: Evidence, side: SideEvidence) -> dict:
    from opensci_patch.diagnose import fp64

    entry = side.index["by_key"].get(("rope.cos", None))
    if entry is None or ("rope.sin", None) not in side.index["by_key"]:
        return result("rope_dims", side.label, False, "no rope.cos/rope.sin recorded", skipped=True)
    dim, hd = fp64.rotary_dim(side.cfg), fp64.head_dim(side.cfg)
    channels = entry["shape"][-1]
    return result(
        "rope_dims",
        side.label,
        channels != dim,
        f"cos/sin in {side.label} cover {channels} channels; the config's rotary dim is {dim} "
        f"(head_dim {hd} * partial_rotary_factor {side.cfg.get('partial_rotary_factor', 1.0)})",
    )


def _rope_angles(cos: Any, sin: Any) -> tuple[Any, Any, str]:
    """The per-frequency cos/sin of a RoPE table in the transformers layout cat(f, f), or interleaved."""
    import torch

    half = cos.shape[-1] // 2
    if torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:]):
        return cos[..., :half], sin[..., :half], "half-duplicated"
    if torch.equal(cos[..., 0::2], cos[..., 1::2]) and torch.equal(sin[..., 0::2], sin[..., 1::2]):
        return cos[..., 0::2], sin[..., 0::2], "interleaved"
    return cos[..., :half], sin[..., :half], "unrecognised"


def _rotate(x: Any, c: Any, s: Any, pairing: str, span: str) -> Any:
    """Rotate `x` (batch, heads, seq, head_dim) by per-frequency c/s (seq, r/2): a candidate RoPE layout."""
    import torch

    r = 2 * c.shape[-1]
    hd = x.shape[-1]
    lo, hi = (0, r) if span == "first" else (hd - r, hd)
    xr = x[..., lo:hi]
    if pairing == "half-split":
        x1, x2 = xr[..., : r // 2], xr[..., r // 2 :]
        rot = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    return torch.cat((x[..., :lo], rot, x[..., hi:]), dim=-1)


def rope_pairing(_ev: Evidence, side: SideEvidence) -> dict:
    """Replay RoPE on the side's own q/k_norm with its own cos/sin: which pairing reproduces its q/k_rope?

    Isolates the rotation step: a wrong table (inv_freq) does not make this check fire, only a
    rotation that is not transformers' half-split on the first `rotary_dim` channels.
    """
    import torch

    from opensci_patch.diagnose import fp64

    label, by_key = side.label, side.index["by_key"]
    entry_cos, entry_sin = by_key.get(("rope.cos", None)), by_key.get(("rope.sin", None))
    if entry_cos is None or entry_sin is None:
        return result("rope_pairing", label, False, "no rope.cos/rope.sin recorded", skipped=True)
    cos, sin = load_stage(side.dir, entry_cos), load_stage(side.dir, entry_sin)
    if not (bool(torch.isfinite(cos).all()) and bool(torch.isfinite(sin).all())):
        return result(
            "rope_pairing", label, False, f"cos/sin in {label} are not finite: pairing not testable", skipped=True
        )
    dim, hd = fp64.rotary_dim(side.cfg), fp64.head_dim(side.cfg)
    c, s, layout = _rope_angles(cos, sin)
    candidates = [("interleaved", "first"), ("half-split", "last"), ("interleaved", "last")]
    tested = 0
    for layer in range(side.index.get("num_layers") or 0):
        for which in ("q", "k"):
            entry_in, entry_out = by_key.get((f"{which}_norm", layer)), by_key.get((f"{which}_rope", layer))
            if entry_in is None or entry_out is None:
                continue
            x, y = load_stage(side.dir, entry_in), load_stage(side.dir, entry_out)
            if x.shape != y.shape or x.shape[-1] < cos.shape[-1]:
                continue
            tested += 1
            limit = threshold(side.dtype, side.dtype, float(y.abs().nan_to_num(0.0).max()))
            err = float((fp64.apply_rope(x, cos, sin) - y).abs().max())
            if not exceeds(err, limit):
                continue
            found = None
            for pairing, span in candidates:
                e = float((_rotate(x, c, s, pairing, span) - y).abs().max())
                if not exceeds(e, limit):
                    found = (pairing, span, e)
                    break
            where = f"layer {layer} {which}_rope"
            if found is None:
                text = (
                    f"{label}'s {where} is not its own {which}_norm rotated by its own cos/sin in any known layout "
                    f"(half-split: max |diff| {err:.2e}; cos/sin layout {layout})"
                )
            else:
                pairing, span, e = found
                part = f" on the {span} {dim} of {hd} channels" if dim < hd else ""
                text = (
                    f"RoPE pairs {pairing} channels{part} in {label}, transformers uses half-split on the first "
                    f"{dim} (reproduces {label}'s {where} to {e:.1e}; half-split misses by {err:.2e})"
                )
            return result(
                "rope_pairing",
                label,
                True,
                text,
                layer=layer,
                pairing=found and found[0],
                span=found and found[1],
                half_split_error=err,
            )
    if not tested:
        return result("rope_pairing", label, False, f"no q/k_norm + q/k_rope pairs recorded in {label}", skipped=True)
    return result(
        "rope_pairing",
        label,
        False,
        f"{label}'s q/k_rope = reference half-split RoPE of its own q/k_norm and cos/sin "
        f"(first {dim} of {hd} channels), {tested} tensors",
    )


def lm_head_tied(_ev: Evidence, side: SideEvidence) -> dict:
    head, conf = side.info.get("lm_head") or {}, side.info.get("config") or {}
    if not (conf.get("tie_word_embeddings") and head.get("present")):
        return result("lm_head_tied", side.label, False, "config does not tie the head: nothing to check")
    tied = head.get("same_storage") or head.get("equal_values")
    text = (
        "lm_head shares embed_tokens' storage"
        if head.get("same_storage")
        else "lm_head equals embed_tokens (separate storage)"
        if tied
        else f"config.tie_word_embeddings is true but lm_head.weight is not embed_tokens.weight in {side.label} "
        f"(max |diff| {fmt(head.get('max_abs_diff'))})"
    )
    return result("lm_head_tied", side.label, not tied, text)


def matches_reference(ev: Evidence, side: SideEvidence) -> dict | None:
    """The first stage where one side leaves fp64 beyond its own dtype's tolerance (both wrong alike shows here)."""
    if ev.reference is None:
        return None
    which = "a" if side is ev.sides[0] else "b"
    side_key, limit_key = f"{which}_ref", f"threshold_{which}"
    first = next((r for r in ev.rows if side_key in r and exceeds(r[side_key], r[limit_key])), None)
    if first is None:
        worst = max((r[side_key] for r in ev.rows if side_key in r), default=0.0)
        return result(
            "matches_reference",
            side.label,
            False,
            f"{side.label} stays within threshold of the fp64 reference at every stage (max |diff| {worst:.1e})",
        )
    p0, rest = first[f"{side_key}_pos0"], first[f"{side_key}_rest"]
    return result(
        "matches_reference",
        side.label,
        True,
        f"{side.label} leaves the fp64 reference at {first['key']} ({where(p0, rest, first[limit_key])}: position 0 "
        f"{fmt(p0)}, positions > 0 {fmt(rest)}, threshold {first[limit_key]:.1e})",
        stage=first["key"],
    )


def fp64_noise(ev: Evidence) -> list[dict]:
    """fp64 noise test: rounding makes both sides a little wrong; a bug makes one orders of magnitude worse."""
    row = ev.first
    if row is None:
        return []
    if "a_ref" not in row:
        return [
            result("fp64_noise", None, False, "no fp64 reference at this stage: noise test not possible", skipped=True)
        ]
    verdict = side_verdict(row, ev.labels)
    times = ratio(row["a_ref"], row["b_ref"])
    dtype_a, dtype_b = (s.dtype for s in ev.sides)
    return [
        result(
            "fp64_noise",
            verdict["wrong"],
            verdict["wrong"] is not None,
            f"at {row['key']}: {verdict['text']} (ratio {times:.1e}; fp64 tolerance {row['threshold_a']:.1e} "
            f"{dtype_a}, {row['threshold_b']:.1e} {dtype_b})",
            ratio=times,
        )
    ]


CHECKS: tuple[Check, ...] = (
    Check("input_ids", ANY_STAGE, input_ids),
    Check("weights_match_checkpoint", ANY_STAGE, per_side(weights_match_checkpoint)),
    Check("buffers_finite", ANY_STAGE, per_side(buffers_finite)),
    Check("inv_freq_values", ROPE_STAGES, per_side(lambda _ev, side: _inv_freq(side)[0])),
    Check("inv_freq_dtype", ROPE_STAGES, per_side(lambda _ev, side: _inv_freq(side)[1])),
    Check("rope_dims", ROPE_STAGES, per_side(rope_dims)),
    Check("rope_pairing", frozenset({"q_rope", "k_rope"}), per_side(rope_pairing)),
    Check("lm_head_tied", frozenset({"logits"}), per_side(lm_head_tied)),
    Check("matches_reference", NO_STAGE, per_side(matches_reference)),
    Check("fp64_noise", NO_STAGE, fp64_noise),
    # first divergence at attn_out with SDPA on a side: the driver re-probes both sides with eager attention
    Check("attention_kernel", frozenset({"attn_out"}), None),
)


def explains(name: str) -> frozenset[str] | None:
    """The stages a fired check of this name can explain (read from the registry when asked)."""
    return next((c.explains for c in CHECKS if c.name == name), ANY_STAGE)


def run_all(ev: Evidence) -> list[dict]:
    """Every registered check that runs on the compared evidence, in registry order."""
    return [r for check in CHECKS if check.run is not None for r in check.run(ev)]
