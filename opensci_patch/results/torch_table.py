"""The torch table: per transformers release, every torch release's cell against the pinned torch's.

Cells that differ only in their torch (same checkpoint, release, device, dtype, attention, variant) and that both
ran ok are compared: bit-identical (first logits, every decode step, greedy ids), else the largest difference of
the top-k logits both have, the first decode step whose logits differ, whether the greedy ids are equal, and each
one's gap to the fp64 reference (the judge of which torch is closer). A difference that a torch release shows on
every transformers release compared is named as torch's, not any transformers release's.

Only cells expected to pass on both torches are compared: a cell declared to fail that still runs ok (5.0/5.1
re-initialising the loaded weights, 5.x's uninitialised `inv_freq` under `structural`) gives garbage by nature,
different from one run to the next on one torch, which says nothing about torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from opensci_patch._util.defaults import DEFAULT_TORCH_BUILD, TORCH_PIN
from opensci_patch.measure import records
from opensci_patch.measure.records import Record
from opensci_patch.results.plot import version_key

# the pinned torch's cells: the default build, or the pin named as a release
PINNED = (DEFAULT_TORCH_BUILD, f"{TORCH_PIN}+cpu")


@dataclass(frozen=True)
class TorchRow:
    checkpoint: str
    transformers: str
    device: str
    dtype: str
    attn: str
    model: str
    torch: str  # the cell's torch spec
    pinned: str  # the pinned torch's cell it is compared with
    bit_identical: bool
    max_abs_diff: float | None  # over the top-k logits both records have; None when bit-identical
    first_step: int | None  # the first decode step (0 = the prompt's forward) whose logits differ
    greedy_equal: bool
    fp64_gap: float | None
    pinned_fp64_gap: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def _steps(rec: Record) -> tuple[str, ...]:
    return tuple(rec.generation.step_logits_sha256) if rec.generation else ()


def _ids(rec: Record) -> tuple[int, ...]:
    return tuple(rec.generation.ids) if rec.generation else ()


def _compare(rec: Record, pin: Record) -> TorchRow:
    c = rec.cell
    mine, theirs = _steps(rec), _steps(pin)
    first = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), None)
    if first is None and len(mine) != len(theirs):
        first = min(len(mine), len(theirs))
    identical = rec.logits_sha256 == pin.logits_sha256 and first is None and _ids(rec) == _ids(pin)
    theirs_logit = {t.id: t.logit for t in pin.topk}
    diffs = [abs(t.logit - theirs_logit[t.id]) for t in rec.topk if t.id in theirs_logit]
    return TorchRow(
        checkpoint=c.checkpoint, transformers=c.transformers, device=c.device, dtype=c.dtype, attn=c.attn,
        model=c.model, torch=c.torch, pinned=pin.cell.torch, bit_identical=identical,
        max_abs_diff=None if identical else (max(diffs) if diffs else None), first_step=first,
        greedy_equal=_ids(rec) == _ids(pin),
        fp64_gap=rec.reference.max_abs_diff if rec.reference else None,
        pinned_fp64_gap=pin.reference.max_abs_diff if pin.reference else None,
    )  # fmt: skip


def torch_rows(recs: list[Record]) -> list[TorchRow]:
    """Every ok cell expected to pass on a torch other than the pinned one, against the pinned torch's cell of the
    same release (also ok and expected to pass)."""
    groups: dict[tuple, dict[str, Record]] = {}
    for r in recs:
        if r.status != records.OK or r.cell is None or (r.expected is not None and r.expected.outcome != "pass"):
            continue
        c = r.cell
        groups.setdefault((c.checkpoint, c.transformers, c.device, c.dtype, c.attn, c.model), {})[c.torch] = r
    out = []
    for members in groups.values():
        pinned = next((members[t] for t in PINNED if t in members), None)
        if pinned is None:
            continue
        out += [_compare(r, pinned) for t, r in members.items() if t not in PINNED]
    return sorted(out, key=lambda t: (t.checkpoint, version_key(t.transformers), t.torch, t.dtype, t.attn, t.model))


def torch_notes(rows: list[TorchRow]) -> list[str]:
    """One line per (torch, device, dtype, attention, variant) that differs from the pinned torch: torch's when it
    differs so on every transformers release compared (two or more), else the releases where it does."""
    series: dict[tuple, list[TorchRow]] = {}
    for t in rows:
        series.setdefault((t.checkpoint, t.torch, t.pinned, t.device, t.dtype, t.attn, t.model), []).append(t)
    out = []
    for (_, torch, pinned, _, dtype, attn, model), members in series.items():
        differ = [t for t in members if not t.bit_identical]
        if not differ:
            continue
        steps = sorted({t.first_step for t in differ if t.first_step is not None})
        what = f"torch {torch} vs {pinned} ({dtype}, {attn}, {model})"
        where = ", ".join(t.transformers for t in differ)
        step = f" from decode step {steps[0]}" if steps else ""
        greedy = "greedy ids equal" if all(t.greedy_equal for t in differ) else "greedy ids differ"
        if len(differ) == len(members) and len(members) > 1:
            out.append(f"{what}: differs{step} on every transformers release compared ({where}; {greedy}): "
                       f"torch's difference, not a transformers release's")  # fmt: skip
        elif len(members) == 1:  # one release ran ok on both torches: nothing to tell torch's from the release's
            out.append(f"{what}: differs{step} on {where}, the only transformers release compared ({greedy}): "
                       "torch's or this release's, not told apart")  # fmt: skip
        else:
            out.append(f"{what}: differs{step} on {where} only, of {len(members)} release(s) compared ({greedy})")
    return out
