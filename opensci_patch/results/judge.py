"""Records -> rows: each cell judged against what it declared (`matrix.expectation`) and its reference cell.

- pass: expected to pass, ran, and its first logits, every decode step's logits and its greedy
  tokens are bit-identical to the reference cell's (same torch build, device, dtype, attention);
- expected-fail: expected to fail (strict xfail) and failed;
- FAIL: expected to pass and did not (model error, KV-cache self-check failed, wrong answer, or not
  bit-identical: the first differing decode step is named);
- XPASS: expected to fail but passed: upstream changed, the expectation must be updated;
- cannot-judge: ran to the end, but there is no reference cell (that ran ok) to compare it with;
- error: the cell could not run (environment install, crash, hotfix failure), never finished
  (its placeholder record says "running"), or is ambiguous (two records for one cell id).

The reference cell of a group is its one finished `matrix.REFERENCE` record: unique by construction,
so never chosen by file-name order. The rows, the grid and the problems make one `Report` value, which
`render` turns into matrix.md and summary.json, so the two cannot disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from opensci_patch.matrix.spec import REFERENCE, VARIANTS
from opensci_patch.measure import records
from opensci_patch.measure.records import Record
from opensci_patch.results.plot import MISSING, variants, version_key
from opensci_patch.results.verdict import bit_identical, failure, first_step_difference, shown_values_differ

BAD = ("FAIL", "XPASS", "error", "cannot-judge")
VERDICTS = ("pass", "expected-fail", "FAIL", "XPASS", "error", "cannot-judge")


def _group(rec: Record) -> tuple:
    return rec.cell.group


def _ambiguous(recs: list[Record], sources: list[str] | None) -> dict[str, str]:
    """cell id -> why it cannot be trusted: several records for it, or its run never finished."""
    names: dict[str, list[str]] = {}
    for i, r in enumerate(recs):
        names.setdefault(r.cell_id, []).append(sources[i] if sources else f"record {i + 1}")
    out = {cid: f"{len(n)} records for this cell ({', '.join(sorted(n))}); keep one" for cid, n in names.items()}
    out = {cid: why for cid, why in out.items() if len(names[cid]) > 1}
    for r in recs:
        if r.cell_id not in out and r.status == records.RUNNING:
            out[r.cell_id] = "never finished (its record still says 'running': killed or still running); re-run it"
        elif r.cell_id not in out and not _same_release(r.environment.get("transformers"), r.cell.transformers):
            out[r.cell_id] = (
                f"the record ran transformers {r.environment.get('transformers')!r}, its cell is "
                f"{r.cell.transformers}: not this cell's result; re-run it"
            )
    return out


def _same_release(ran, declared) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(str(ran)) == Version(str(declared))
    except InvalidVersion:
        return False


def references(recs: list[Record], ambiguous: dict[str, str] | None = None) -> dict[tuple, Record]:
    """The reference record per group: the one finished, unambiguous `REFERENCE` cell with status ok.

    Keyed by group, and by (group, variant) for a variant compared with its own reference-release
    cell (`Variant.reference`, e.g. a checkpoint with weights of its own)."""
    ambiguous = _ambiguous(recs, None) if ambiguous is None else ambiguous
    own = {v.reference for v in VARIANTS.values()} - {REFERENCE[1]}
    out = {}
    for r in recs:
        c = r.cell
        if c.transformers != REFERENCE[0] or r.status != records.OK or r.cell_id in ambiguous:
            continue
        if c.model == REFERENCE[1]:
            out[_group(r)] = r
        elif c.model in own:
            out[(_group(r), c.model)] = r
    return out


def reference_of(refs: dict[tuple, Record], rec: Record) -> Record | None:
    """The record `rec` is compared with: its group's reference cell, or its variant's own one."""
    variant = VARIANTS.get(rec.cell.model)
    if variant is not None and variant.reference != REFERENCE[1]:
        return refs.get((_group(rec), variant.reference))
    return refs.get(_group(rec))


def broken_decode(recs: list[Record]) -> list[str]:
    """One line per reference cell (of a group, or of a variant's own) that failed the KV-cache self-check.

    The reference release decoding wrongly is the model's own bug (e.g. its cache update commented
    out), not a release's: it is said once, with the first bad step, next to the variant's FAILs.
    """
    own = {REFERENCE[1]} | {v.reference for v in VARIANTS.values()}
    out = []
    for ref in recs:
        c = ref.cell
        if c.transformers != REFERENCE[0] or c.model not in own or ref.status != records.Status.GENERATE_MISMATCH:
            continue
        same = [r for r in recs if _group(r) == _group(ref) and r.cell.model == c.model]
        bad = sum(r.status == records.Status.GENERATE_MISMATCH for r in same)
        where = "on every release" if bad == len(same) else f"on {bad} of {len(same)} releases"
        detail = (ref.generation.kv_check.detail if ref.generation else "") or (ref.error.message if ref.error else "")
        out.append(
            f"{c.model} ({', '.join(_group(ref))}): the model's own decode is broken {where}, "
            f"including the reference (transformers {REFERENCE[0]}): {detail}"
        )
    return out


def verdict(rec: Record, ref: Record | None) -> tuple[str, str]:
    if rec.status.no_evidence:
        return "error", failure(rec)
    if rec.status == records.OK and ref is None:  # ran, but nothing to compare with: neither pass nor FAIL
        return "cannot-judge", f"no reference cell ({' '.join(REFERENCE)}, same build, dtype and attention) that ran ok"
    ok, why = bit_identical(rec, ref)
    if rec.expected.outcome == "xfail":
        reason = rec.expected.reason
        return ("XPASS", "expected to fail but passed: " + reason) if ok else ("expected-fail", reason)
    return ("pass", "") if ok else ("FAIL", why)


def _top10_diff(rec: Record, ref: Record | None) -> float | None:
    if not ref or not rec.topk:
        return None
    ref_logit = {t.id: t.logit for t in ref.topk}
    diffs = [abs(t.logit - ref_logit[t.id]) for t in rec.topk if t.id in ref_logit]
    return float("inf") if len(diffs) < len(rec.topk) else max(diffs)


def _decode(rec: Record, ref: Record | None) -> str | None:
    """The decode-steps column: '= (N)' when all N steps match the reference, else what differs."""
    steps = rec.generation.step_logits_sha256 if rec.generation else None
    if rec.status != records.OK or not steps or ref is None:
        return None
    return first_step_difference(rec, ref) or f"= ({len(steps)})"


@dataclass(frozen=True)
class Row:
    """One cell of the report: what matrix.md's detail table and summary.json's "rows" show of it."""

    cell: str
    transformers: str
    torch: str  # the torch version the record ran with
    build: str  # the cell's torch build (cpu, cu128, ...)
    device: str
    dtype: str
    attn: str
    model: str
    status: str  # the verdict (VERDICTS)
    paris_logit: float | None
    rank: int | None
    top1: str | None
    top10_max_diff: float | None
    bit_identical: bool | None
    decode_steps: str | None
    fp64_ref_diff: float | None
    greedy: str | None
    why: str
    overrides: tuple[str, ...]
    ambiguous: bool

    def to_dict(self) -> dict:
        return {**asdict(self), "overrides": list(self.overrides)}


def _row(r: Record, ref: Record | None, verdict_why: tuple[str, str], trusted: bool) -> Row:
    v, why = verdict_why
    t = r.target if trusted else None
    gen = r.generation.text if trusted and r.generation else None
    c = r.cell
    return Row(
        cell=c.id,
        transformers=c.transformers,
        torch=r.environment.get("torch", c.torch),
        build=c.torch,
        device=_device(r),
        dtype=c.dtype,
        attn=c.attn,
        model=c.model,
        status=v,
        paris_logit=t.logit if t else None,
        rank=t.rank if t else None,
        top1=r.topk[0].token if r.topk and trusted else None,
        top10_max_diff=_top10_diff(r, ref) if trusted else None,
        bit_identical=(r.logits_sha256 == ref.logits_sha256 and not shown_values_differ(r, ref))
        if trusted and ref and r.logits_sha256
        else None,
        decode_steps=_decode(r, ref) if trusted else None,
        fp64_ref_diff=r.reference.max_abs_diff if trusted and r.reference else None,  # None where not applicable
        greedy=(gen[:40] + "...") if gen and len(gen) > 40 else gen,
        why=why,
        # shown like an override: "+PKG" for each package `cell --require` added to the env
        overrides=(
            *(r.environment.get("overrides") or ()),
            *(f"+{x}" for x in r.environment.get("extra_requirements") or ()),
        ),
        ambiguous=not trusted,
    )


def rows(recs: list[Record], sources: list[str] | None = None) -> list[Row]:
    """One row per cell id, sorted by release, build, dtype, attention and variant order in `VARIANTS`."""
    ambiguous = _ambiguous(recs, sources)
    refs = references(recs, ambiguous)
    order = {m: i for i, m in enumerate(VARIANTS)}
    seen: set[str] = set()
    out = []
    for r in sorted(
        recs,
        key=lambda r: (
            version_key(r.cell.transformers),
            r.cell.torch,
            r.cell.dtype,
            r.cell.attn,
            order.get(r.cell.model, len(order)),
            r.cell.model,
        ),
    ):
        if r.cell_id in seen:
            continue
        seen.add(r.cell_id)
        ref = reference_of(refs, r)
        trusted = r.cell_id not in ambiguous
        out.append(_row(r, ref, verdict(r, ref) if trusted else ("error", ambiguous[r.cell_id]), trusted))
    return out


def _device(rec: Record) -> str:
    """'cpu', or the GPU's name as the capture saw it (e.g. 'cuda: NVIDIA H100 80GB HBM3')."""
    device = rec.cell.device
    name = rec.environment.get("device_name")
    return f"{device}: {name}" if device != "cpu" and name else device


def group_name(r: Row) -> str:
    return f"{r.build} torch, {r.device}, {r.dtype}, {r.attn}"


def grid(table: list[Row]) -> dict[str, dict[str, dict[str, str]]]:
    """group ('cpu torch, cpu, float32, eager') -> release -> variant -> verdict or 'missing'."""
    cols = variants(table)
    out: dict[str, dict[str, dict[str, str]]] = {}
    for r in table:
        out.setdefault(group_name(r), {})
    for name in out:
        members = [r for r in table if group_name(r) == name]
        releases = sorted({r.transformers for r in members}, key=version_key)
        out[name] = {v: dict.fromkeys(cols, MISSING) for v in releases}
        for r in members:
            out[name][r.transformers][r.model] = r.status
    return out


@dataclass
class Report:
    """Everything the report says; matrix.md and summary.json are two renderings of it."""

    table: list[Row]
    problems: list[str]
    grid: dict[str, dict[str, dict[str, str]]]
    new_releases: list[str]
    previous: dict[str, str] | None  # the verdicts of the summary.json found before writing, None if none
    n_records: int

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.table:
            out[r.status] = out.get(r.status, 0) + 1
        return dict(sorted(out.items()))

    @property
    def bad(self) -> int:
        """Cells that are FAIL, XPASS, error or cannot-judge, plus record files refused: the exit status's reason."""
        return sum(self.counts.get(k, 0) for k in BAD) + len(self.problems)

    def problem_lines(self) -> list[str]:
        """Refused files, then ambiguous cells (duplicate, never finished)."""
        return [*self.problems, *(f"{r.cell}: {r.why}" for r in self.table if r.ambiguous)]
