"""The decode loop: what `generate` hands the model at each step, and whether the cached steps are right.

A single forward proves nothing about generation: transformers 5.24 passes the KV cache as
`cache=`, a forward that reads only `past_key_values` builds a fresh cache at every step, and
the first logits stay bit-identical while the text goes wrong from token 2. So the probe also
runs greedy `generate` (as capture does, `max_new_tokens` steps) with a forward pre-hook on the
top-level model (`with_kwargs=True`) that records, per step, what the forward receives: the
cache object under `past_key_values` and under `cache` (type, length before and after the step),
position_ids, cache_position, the attention-mask shape; plus every step's logits
(`output_logits=True`) and the same step recomputed without a cache (one full forward over the
prompt and the tokens generated so far). `compare_decode` then compares A with B and each side
with its own no-cache recomputation (the stage thresholds, dtype-aware) and `explain_step` names
the cause at the first bad step from the recorded calls.

Standard library at import time (the driver reads `DEFAULT_DECODE_STEPS`); torch only inside.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opensci_patch.diagnose.stages import (
    DECODE,
    DECODE_LOGITS,
    NOCACHE_LOGITS,
    exceeds,
    fmt,
    read_json,
    threshold,
    write_json,
)
from opensci_patch.measure.capture import CaptureSettings
from opensci_patch.measure.records import error_info

DEFAULT_DECODE_STEPS: int = CaptureSettings.max_new_tokens  # the same steps as capture's greedy generation
CACHE_KWARGS = ("past_key_values", "cache")  # the names generate has passed the KV cache under (cache: 5.24+)
POSITIONS_KEPT = 64  # position_ids / cache_position: the last this many values are recorded


# ---------------------------------------------------------------------------------------------
# inside an env: recording


def _cache_length(cache: Any) -> int | None:
    """Tokens held by a cache object (a `Cache`, or the legacy tuple of (key, value) per layer)."""
    try:
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)):
            return int(cache[0][0].shape[-2])
    except Exception:  # noqa: BLE001 - an unreadable cache is recorded as such, not fatal
        return None
    return None


def _cache_view(cache: Any) -> dict:
    return {"type": type(cache).__name__, "length": _cache_length(cache)}


def _positions(t: Any) -> list[int] | None:
    return None if t is None else [int(x) for x in t.reshape(-1)[-POSITIONS_KEPT:].tolist()]


def _shape(t: Any) -> list[int] | None:
    return None if t is None or not hasattr(t, "shape") else list(t.shape)


def _returned_cache(output: Any) -> Any:
    keys = output.keys() if hasattr(output, "keys") else ()
    return next((output[name] for name in CACHE_KWARGS if name in keys), None)


def forward_parameters(lm: Any) -> tuple[list[str], bool]:
    """The explicit parameters of the model's forward, and whether it takes **kwargs."""
    params = inspect.signature(type(lm).forward).parameters
    names = [n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _call_recorders(calls: list[dict]) -> tuple[Callable[..., None], Callable[..., None]]:
    """A forward pre-hook and hook (`with_kwargs=True`) that append to `calls`, per forward call, what it received
    (the cache objects, positions, mask shape) and what the caches held after it and what it returned."""
    received: list[dict[str, Any]] = []  # per call, the cache objects themselves (read again after the step)

    def before(_module: Any, args: Any, kwargs: dict) -> None:
        caches = {name: kwargs[name] for name in CACHE_KWARGS if kwargs.get(name) is not None}
        received.append(caches)
        calls.append(
            {
                "kwargs": sorted(kwargs),
                "positional_args": len(args),
                "cache_in": {name: _cache_view(c) for name, c in caches.items()},
                "input_ids": _shape(kwargs.get("input_ids")),
                "position_ids": _positions(kwargs.get("position_ids")),
                "cache_position": _positions(kwargs.get("cache_position")),
                "attention_mask": _shape(kwargs.get("attention_mask")),
                "use_cache": kwargs.get("use_cache") if isinstance(kwargs.get("use_cache"), bool) else None,
            }
        )

    def after(_module: Any, _args: Any, _kwargs: dict, output: Any) -> None:
        if not calls:
            return
        caches = received[-1]
        calls[-1]["cache_after"] = {name: _cache_length(c) for name, c in caches.items()}
        returned = _returned_cache(output)
        calls[-1]["cache_out"] = (
            None
            if returned is None
            else _cache_view(returned) | {"same_object": any(returned is c for c in caches.values())}
        )

    return before, after


def _greedy_generate(lm: Any, input_ids: Any, steps: int, pad: int | None) -> Any:
    """Greedy `generate` as capture runs it, returning every step's logits."""
    import torch

    with torch.no_grad():
        return lm.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=pad,
            output_logits=True,
            return_dict_in_generate=True,
        )


def _nocache_logits(lm: Any, sequence: Any, prompt_length: int, steps: int) -> Any:
    """Each decode step's last-position logits recomputed by one full forward without a cache."""
    import torch

    with torch.no_grad():
        return torch.stack(
            [
                lm(input_ids=sequence[None, : prompt_length + k], use_cache=False).logits[0, -1].float().cpu()
                for k in range(steps)
            ]
        )


def _failed(record: dict, status: str, exc: Exception, out: Path) -> dict:
    """The model code failed in the decode loop: a finding, written to `decode.json` with its error."""
    record |= {"status": status, "error": error_info(exc).to_dict()}
    write_json(out / DECODE, record)
    return record


def record_decode(lm: Any, tokenizer: Any, input_ids: Any, steps: int, out: Path) -> dict:
    """Greedy `generate` with the recording hooks, then each step again without a cache; write `out/decode*`.

    The model failing inside `generate` or the recomputation is a result (status and error in
    `decode.json`), as in capture.
    """
    import torch

    params, var_kwargs = forward_parameters(lm)
    record: dict[str, Any] = {
        "status": "ok",
        "steps": 0,
        "prompt_length": int(input_ids.shape[1]),
        "forward_params": params,
        "forward_var_kwargs": var_kwargs,
        "calls": [],
    }
    before, after = _call_recorders(record["calls"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    handles = [
        lm.register_forward_pre_hook(before, with_kwargs=True),
        lm.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        generated = _greedy_generate(lm, input_ids, steps, pad)
    except Exception as exc:  # noqa: BLE001 - the model code failing in generate is a finding
        return _failed(record, "generate-error", exc, out)
    finally:
        for h in handles:
            h.remove()
    prompt_length = record["prompt_length"]
    sequence = generated.sequences[0]
    step_logits = torch.stack([step[0].float().cpu() for step in generated.logits])
    record |= {
        "steps": int(step_logits.shape[0]),
        "tokens": sequence[prompt_length:].tolist(),
        "logits_dtype": str(generated.logits[0].dtype).removeprefix("torch."),
    }
    torch.save(step_logits, out / DECODE_LOGITS)
    try:
        nocache = _nocache_logits(lm, sequence, prompt_length, record["steps"])
    except Exception as exc:  # noqa: BLE001
        return _failed(record, "forward-error", exc, out)
    torch.save(nocache, out / NOCACHE_LOGITS)
    record["nocache_argmax"] = nocache.argmax(dim=-1).tolist()
    write_json(out / DECODE, record)
    return record


# ---------------------------------------------------------------------------------------------
# inside an env: comparing (loads the logits); naming the cause needs only the recorded calls


def _max_abs(x: Any) -> float:
    """max |x|, NaN when any entry is NaN or infinite (never silently passed)."""
    import torch

    return float(x.abs().max()) if bool(torch.isfinite(x).all()) else math.nan


def _scale(x: Any) -> float:
    import torch

    finite = x[torch.isfinite(x)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _self_check(label: str, decode: dict, dtype: str, logits: Any, nocache: Any) -> dict:
    """One side's cached steps against its own no-cache recomputation; the first bad step, explained."""
    per_step, first = [], None
    for k in range(decode["steps"]):
        limit = threshold(dtype, dtype, _scale(nocache[k]))
        diff = _max_abs(logits[k] - nocache[k])
        per_step.append(diff)
        if first is None and exceeds(diff, limit):
            first = {"step": k, "max_abs_diff": diff, "threshold": limit}
    out: dict[str, Any] = {"status": decode["status"], "per_step": per_step, "first_bad_step": first}
    if first is not None:
        k = first["step"]
        out["text"] = (
            f"{label}: decode step {k}: logits leave the no-cache recomputation "
            f"(max |diff| {fmt(first['max_abs_diff'])} > {first['threshold']:.1e}); {explain_step(decode, k)}"
        )
    return out


def explain_step(decode: dict, step: int) -> str:
    """Why a cached decode step differs from its no-cache recomputation, from what the forward received."""
    calls = decode.get("calls") or []
    if step >= len(calls):
        return f"no forward call was recorded for step {step} (the forward ran {len(calls)} times)"
    call = calls[step]
    prompt_length = decode["prompt_length"]
    expected_length = prompt_length + step - 1 if step else 0
    cache_in, cache_after = call.get("cache_in") or {}, call.get("cache_after") or {}
    params = decode.get("forward_params") or []
    reads = [n for n in CACHE_KWARGS if n in params]
    if not cache_in:
        return (
            "the model's forward got no cache (generate passed neither `past_key_values=` nor `cache=`"
            + (f"; use_cache={call['use_cache']}" if call.get("use_cache") is not None else "")
            + ")"
        )
    passed = [n for n in CACHE_KWARGS if n in cache_in]
    read_passed = [n for n in passed if n in params]

    def grew(name: str) -> bool:
        before, after = cache_in[name].get("length"), cache_after.get(name)
        return before is not None and after is not None and after > before

    if not read_passed and not any(grew(n) for n in passed):
        reads_text = f"the model reads `{'`/`'.join(reads)}`" if reads else "its forward lists no cache parameter"
        return f"the model's forward got no cache (generate passed `{'=`, `'.join(passed)}=`; {reads_text})"
    name = (read_passed or passed)[0]
    before, after = cache_in[name].get("length"), cache_after.get(name)
    if before is not None and after is not None and after == before and step > 0:
        return (
            f"the model got a cache of length {before} (as `{name}=`) and left it at {after}: "
            "its forward drops the cache"
        )
    if before is not None and before != expected_length:
        return (
            f"the model got a cache of length {before} (as `{name}=`) where {expected_length} tokens precede this step"
        )
    expected_position = prompt_length + step - 1
    for key in ("position_ids", "cache_position"):
        values = call.get(key)
        if values and values[-1] != expected_position:
            return (
                f"the model got {key} ending at {values[-1]} where this step's token is at position {expected_position}"
            )
    return (
        f"the model got a cache of length {before} that grew to {after}, positions as expected: the cached forward "
        f"itself computes something else than the full one (attention over the cache, mask shape "
        f"{call.get('attention_mask')})"
    )


def compare_decode(dir_a: Path, dir_b: Path, labels: tuple[str, str], dtypes: tuple[str, str]) -> dict:
    """A vs B step by step (logits and tokens), and each side against its own no-cache recomputation."""
    import torch

    decodes = [read_json(d / DECODE) if (d / DECODE).is_file() else None for d in (dir_a, dir_b)]
    result: dict[str, Any] = {"labels": list(labels), "sides": {}, "findings": []}
    if any(d is None for d in decodes):
        missing = [lab for lab, d in zip(labels, decodes, strict=True) if d is None]
        return result | {"status": "skipped", "diverged": None, "why": f"no decode steps recorded in {missing}"}
    tensors = {}
    for label, d, decode, dtype in zip(labels, (dir_a, dir_b), decodes, dtypes, strict=True):
        if decode["status"] != "ok":
            err = decode.get("error") or {}
            result["sides"][label] = {"status": decode["status"], "error": err}
            result["findings"].append(
                f"{label}: decode: {decode['status']}: {err.get('type', '')}: {err.get('message', '')}"
            )
            continue
        logits = torch.load(d / DECODE_LOGITS, weights_only=True).double()
        nocache = torch.load(d / NOCACHE_LOGITS, weights_only=True).double()
        tensors[label] = (logits, nocache)
        result["sides"][label] = side = _self_check(label, decode, dtype, logits, nocache)
        side["tokens"] = decode["tokens"]
        if "text" in side:
            result["findings"].append(side["text"])
    if not tensors:  # neither side got through the decode loop: nothing to compare
        return result | {"status": "error", "diverged": None}
    if len(tensors) < 2:  # one side ran it, the other failed: they differ
        return result | {"status": "diverged", "diverged": True, "first_step": None, "first_token": None}
    (logits_a, nocache_a), (logits_b, _) = tensors[labels[0]], tensors[labels[1]]
    tokens_a, tokens_b = decodes[0]["tokens"], decodes[1]["tokens"]
    per_step, first = [], None
    for k in range(min(logits_a.shape[0], logits_b.shape[0])):
        if logits_a[k].shape != logits_b[k].shape:
            first = first or {"step": k, "why": f"vocab sizes differ: {logits_a.shape[-1]} vs {logits_b.shape[-1]}"}
            break
        limit = threshold(dtypes[0], dtypes[1], _scale(nocache_a[k]))
        diff = _max_abs(logits_a[k] - logits_b[k])
        per_step.append(diff)
        if first is None and exceeds(diff, limit):
            first = {"step": k, "max_abs_diff": diff, "threshold": limit}
    first_token = next((i for i, (x, y) in enumerate(zip(tokens_a, tokens_b, strict=False)) if x != y), None)
    if first_token is None and len(tokens_a) != len(tokens_b):
        first_token = min(len(tokens_a), len(tokens_b))
    diverged = first is not None or first_token is not None
    result |= {
        "status": "diverged" if diverged else "agree",
        "diverged": diverged,
        "steps": min(len(tokens_a), len(tokens_b)),
        "ab_per_step": per_step,
        "first_step": first,
        "first_token": first_token,
    }
    return result
