"""Inside an env: compare two probes (and the fp64 reference) stage by stage, then run the named checks.

"Earlier stages agree" makes the first divergence in forward order the stage with its own error
(the fx minimizer's question) without re-feeding inputs. RoPE is the identity at position 0, so
every difference is split into position 0 and positions > 0: a RoPE bug shows only at > 0.
`compare` loads one stage at a time; nothing is kept but the per-stage numbers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from opensci_patch.diagnose import checks, fp64
from opensci_patch.diagnose.decode import compare_decode
from opensci_patch.diagnose.stages import (
    BUFFERS,
    DECODE,
    MODEL_INFO,
    exceeds,
    load_stage,
    nanmax,
    read_index,
    read_json,
    seq_axis,
    side_verdict,
    stage_key,
    stage_order,
    threshold,
    where,
)


def split_positions(diff: torch.Tensor, axis: int) -> tuple[float, float, list[float]]:
    """Max of |diff| at position 0, at positions > 0, and per position (NaN propagates: it diverges)."""
    per = diff.abs().movedim(axis, 0).reshape(diff.shape[axis], -1)
    nan = per.isnan().any(dim=1)
    per_pos = per.nan_to_num(nan=0.0).amax(dim=1)
    values = [math.nan if bool(n) else float(v) for v, n in zip(per_pos, nan, strict=True)]
    rest = values[1:]
    return values[0], (math.nan if any(math.isnan(v) for v in rest) else max(rest, default=0.0)), values


def _side(label: str, d: Path) -> checks.SideEvidence:
    index = read_index(d)
    return checks.SideEvidence(
        label=label,
        dir=d,
        info=read_json(d / MODEL_INFO),
        dtype=index["dtype"],
        index=index,
        buffers=read_json(d / BUFFERS),
        cfg=fp64.read_config(d),
    )


def compare(dir_a: Path, dir_b: Path, dir_ref: Path | None = None, labels: tuple[str, str] = ("A", "B")) -> dict:
    """Stage-by-stage comparison of two probes (and the fp64 reference), plus the root-cause checks.

    When every stage agrees and both probes recorded the decode loop, the decode steps are
    compared too (`decode.compare_decode`, under "decode"): a bug of the decode loop leaves the
    single forward intact.
    """
    side_a, side_b = _side(labels[0], dir_a), _side(labels[1], dir_b)
    ref_index = read_index(dir_ref) if dir_ref is not None else None
    rows, missing = _compare_stages(side_a, side_b, dir_ref, ref_index)
    first = next((r for r in rows if r["diverged"]), None)
    result: dict[str, Any] = {
        "labels": list(labels),
        "dtypes": [side_a.dtype, side_b.dtype],
        "stages": rows,
        "missing_stages": missing,
        "first_divergence": first,
    }
    if first is not None:
        result["first_divergence_verdict"] = side_verdict(first, labels)
    evidence = checks.Evidence(labels, (side_a, side_b), ref_index, rows, first)
    result["checks"] = checks.run_all(evidence)
    if first is None and (dir_a / DECODE).is_file() and (dir_b / DECODE).is_file():
        result["decode"] = compare_decode(dir_a, dir_b, labels, (side_a.dtype, side_b.dtype))
    return result


def _compare_stages(
    side_a: checks.SideEvidence, side_b: checks.SideEvidence, dir_ref: Path | None, ref_index: dict | None
) -> tuple[list[dict], list[str]]:
    labels = (side_a.label, side_b.label)
    dtype_a, dtype_b = side_a.dtype, side_b.dtype
    num_layers = max(side_a.index.get("num_layers") or 0, side_b.index.get("num_layers") or 0)
    rows: list[dict] = []
    missing: list[str] = []
    for stage, layer in stage_order(num_layers):
        key = stage_key(stage, layer)
        entry_a, entry_b = side_a.index["by_key"].get((stage, layer)), side_b.index["by_key"].get((stage, layer))
        entry_ref = ref_index["by_key"].get((stage, layer)) if ref_index else None
        if entry_a is None or entry_b is None:
            absent = [lab for lab, e in zip(labels, (entry_a, entry_b), strict=True) if e is None]
            missing.append(f"{key} (not recorded in {' and '.join(absent)})")
            continue
        ta, tb = load_stage(side_a.dir, entry_a), load_stage(side_b.dir, entry_b)
        tr = load_stage(dir_ref, entry_ref) if entry_ref is not None and dir_ref is not None else None
        row: dict[str, Any] = {
            "stage": stage,
            "layer": layer,
            "key": key,
            "shape_a": entry_a["shape"],
            "shape_b": entry_b["shape"],
        }
        if ta.shape != tb.shape:
            row |= {
                "diverged": True,
                "where": "shape",
                "why": f"shapes differ: {labels[0]} {list(ta.shape)}, {labels[1]} {list(tb.shape)}",
            }
            if tr is not None:
                row["ref_shape"] = list(tr.shape)
                row["closer"] = labels[0] if ta.shape == tr.shape else labels[1] if tb.shape == tr.shape else None
            rows.append(row)
            continue
        axis = seq_axis(stage)
        scale = tr if tr is not None else ta  # without a reference, A's own magnitude (finite part)
        ref_max = float(scale[torch.isfinite(scale)].abs().max()) if bool(torch.isfinite(scale).any()) else 0.0
        limit = threshold(dtype_a, dtype_b, ref_max)
        p0, rest, per = split_positions(ta - tb, axis)
        row |= {"ab_pos0": p0, "ab_rest": rest, "ab_per_position": per, "ref_max": ref_max, "threshold": limit}
        if tr is not None and tr.shape == ta.shape:
            a0, ar, _ = split_positions(ta - tr, axis)
            b0, br, _ = split_positions(tb - tr, axis)
            row |= {
                "threshold_a": threshold(dtype_a, dtype_a, ref_max),
                "threshold_b": threshold(dtype_b, dtype_b, ref_max),
                "a_ref_pos0": a0,
                "a_ref_rest": ar,
                "b_ref_pos0": b0,
                "b_ref_rest": br,
                "a_ref": nanmax(a0, ar),
                "b_ref": nanmax(b0, br),
            }
        row["diverged"] = exceeds(p0, limit) or exceeds(rest, limit)
        row["where"] = where(p0, rest, limit) if row["diverged"] else None
        rows.append(row)
        del ta, tb, tr
    return rows, missing
