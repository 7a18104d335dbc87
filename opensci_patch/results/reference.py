"""Which cell each cell is compared with, and why: one reference per (checkpoint, group, reference variant).

A group is the cells of one torch build, device, dtype and attention (`CellInfo.group`); a checkpoint is ours
(`matrix.SHIPPED`: the shipped fixture and the own-checkpoint variants) or a `cell --model DIR` one; the
reference variant is `Variant.reference` of the cell's variant ("patched", or a variant's own).

The reference release is the one `report --reference-release` names, else for our checkpoints the declared
one (`spec.REFERENCE`, 4.48.0: a cell is never compared with itself because 4.48.0 was not run), else for a
`cell --model` checkpoint the oldest release where the reference variant ran ok: a model that cannot run on
4.48.0 (it imports a module added later) is compared with the first release that runs it. A release older
than that whose reference cell is ambiguous (two records, never finished) leaves no reference: which release
runs first is then unknown.
"""

from __future__ import annotations

from dataclasses import dataclass

from opensci_patch.matrix.spec import REFERENCE, SHIPPED, VARIANTS
from opensci_patch.measure import records
from opensci_patch.measure.records import Record
from opensci_patch.results.plot import version_key
from opensci_patch.results.verdict import failure


def reference_variant(model: str) -> str:
    variant = VARIANTS.get(model)
    return variant.reference if variant is not None else REFERENCE[1]


def key_of(rec: Record) -> tuple:
    """(checkpoint, group, reference variant): the cells compared with one reference cell."""
    return (rec.cell.checkpoint, rec.cell.group, reference_variant(rec.cell.model))


def cell_key(rec: Record) -> tuple:
    """The cell a record is of, by its fields (checkpoint, release, torch build, device, dtype, attention, variant):
    two records of one cell are duplicates whatever their `cell.id` strings say."""
    c = rec.cell
    return (c.checkpoint, c.transformers, c.torch, c.device, c.dtype, c.attn, c.model)


def checkpoint_name(checkpoint: str) -> str:
    return "shipped" if checkpoint == SHIPPED else checkpoint


@dataclass(frozen=True)
class Reference:
    """The reference of one key: its record (None: none to compare with), release, and the report's line."""

    record: Record | None
    release: str | None
    line: str


def _line(key: tuple, text: str) -> str:
    checkpoint, group, variant = key
    return f"{checkpoint_name(checkpoint)}, {variant} ({', '.join(group)}): {text}"


def choose(recs: list[Record], ambiguous: dict[tuple, str], release: str | None = None) -> dict[tuple, Reference]:
    """The reference of every key the records have, each with the line that says which release and why."""
    out = {}
    for key in dict.fromkeys(key_of(r) for r in recs):
        cells = [r for r in recs if (r.cell.checkpoint, r.cell.group, r.cell.model) == key]
        out[key] = _choose_one(key, sorted(cells, key=lambda r: version_key(r.cell.transformers)), ambiguous, release)
    return out


def _choose_one(key: tuple, cells: list[Record], ambiguous: dict[tuple, str], release: str | None) -> Reference:
    variant = key[2]
    named = "--reference-release" if release is not None else "the declared reference release"
    if release is None and key[0] == SHIPPED:  # ours: declared (`spec.REFERENCE`), never a later one found by chance
        release = REFERENCE[0]
    if release is not None:
        at = [r for r in cells if r.cell.transformers == release]
        if at and cell_key(at[0]) not in ambiguous and at[0].status == records.OK:
            said = "as --reference-release says" if named.startswith("--") else named
            return Reference(at[0], release, _line(key, f"transformers {release}, {said}"))
        why = "no record" if not at else ambiguous.get(cell_key(at[0])) or failure(at[0])
        return Reference(None, release, _line(key, f"none: {named} {release} has {why}; cannot judge"))
    failed = []
    for r in cells:
        if cell_key(r) in ambiguous:
            text = f"none: its cell on {r.cell.transformers} cannot be trusted ({ambiguous[cell_key(r)]}); cannot judge"
            return Reference(None, None, _line(key, text))
        if r.status == records.OK:
            text = f"transformers {r.cell.transformers}, the oldest release where {variant} runs"
            if failed:
                text += f" (not on {', '.join(x.cell.transformers for x in failed)}: {failure(failed[0])})"
            return Reference(r, r.cell.transformers, _line(key, text))
        failed.append(r)
    text = f"none: {variant} runs on no release here" + (f" ({failure(failed[0])})" if failed else "")
    return Reference(None, None, _line(key, text + "; cannot judge"))


def before_reference(rec: Record, ref: Reference | None) -> bool:
    """The cell's release is older than its reference release (the model does not run there)."""
    return bool(ref and ref.release) and version_key(rec.cell.transformers) < version_key(ref.release)


def broken_decode(recs: list[Record], refs: dict[tuple, Reference], release: str | None = None) -> list[str]:
    """One line per reference series whose oldest cell (or its `release` cell) failed the KV-cache self-check:
    the model's own bug (e.g. its cache update commented out), not a release's, said once with the first bad
    step, next to the variant's FAILs."""
    out = []
    for key in refs:
        checkpoint, group, variant = key
        same = [r for r in recs if (r.cell.checkpoint, r.cell.group, r.cell.model) == key]
        same.sort(key=lambda r: version_key(r.cell.transformers))
        first = next((r for r in same if r.cell.transformers == release), None) if release else None
        first = first if release else (same[0] if same else None)
        if first is None or first.status != records.Status.GENERATE_MISMATCH:
            continue
        bad = sum(r.status == records.Status.GENERATE_MISMATCH for r in same)
        where = "on every release" if bad == len(same) else f"on {bad} of {len(same)} releases"
        gen = first.generation
        detail = (gen.kv_check.detail if gen else "") or (first.error.message if first.error else "")
        label = variant if checkpoint == SHIPPED else f"{checkpoint}/{variant}"
        which = "the reference" if release else "the oldest release"
        out.append(
            f"{label} ({', '.join(group)}): the model's own decode is broken {where}, "
            f"including {which} (transformers {first.cell.transformers}): {detail}"
        )
    return out
