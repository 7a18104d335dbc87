"""Records -> rows: each cell judged against what it declared (`matrix.expectation`) and its reference cell.

- pass: ran, and its first logits, every decode step's logits and its greedy tokens are bit-identical
  to the reference cell's (same checkpoint, torch build, device, dtype, attention; `reference`);
- expected-fail: failed as a rule declared, showing the rule's signature (its error or its measured
  symptom); or, on a user's checkpoint (`cell --model`), failed where nothing was promised: unpatched
  code, or a release older than the oldest that runs the model. The note starts with the record's own error;
- FAIL: expected to pass and did not (model error, KV-cache self-check failed, wrong answer, or not
  bit-identical: the first differing decode step is named), or failed otherwise than declared;
- XPASS: declared to fail on this checkpoint (a rule naming it: ours) but passed: upstream changed;
- cannot-judge: ran to the end, but there is no reference cell (that ran ok) to compare it with;
- unsupported-pair: the cell's transformers release does not support its torch (the release's own requirement,
  e.g. torch>=2.6, in the note): a declared fact, not a result about the model, so not in the exit status;
- error: the cell could not run (environment install, crash, hotfix failure), never finished
  (its placeholder record says "running"), or is ambiguous (two records of one cell, by its fields).

The reference cell (`reference.choose`) is never chosen by file-name order. A failure identical on every
release of a checkpoint is said once (`same_everywhere`). The rows, the grid and the problems make one
`Report` value, which `render` turns into matrix.md and summary.json, so the two cannot disagree.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

from opensci_patch.matrix.spec import SHIPPED, VARIANTS, WRONG_LOGITS
from opensci_patch.measure import records
from opensci_patch.measure.records import Record
from opensci_patch.results.plot import MISSING, columns, version_key
from opensci_patch.results.reference import Reference, before_reference, cell_key, checkpoint_name, choose, key_of
from opensci_patch.results.verdict import TOLERANCE, bit_identical, failure, first_step_difference, shown_values_differ

OTHER_ATTENTION = {"eager": "sdpa", "sdpa": "eager"}  # what a file may support instead
BAD = ("FAIL", "XPASS", "error", "cannot-judge")
VERDICTS = ("pass", "expected-fail", "FAIL", "XPASS", "error", "cannot-judge", "unsupported-pair")


def _ambiguous(recs: list[Record], sources: list[str] | None) -> dict[tuple, str]:
    """cell (`cell_key`) -> why it cannot be trusted: several records for it (by its fields, or several cells
    claiming one id), or its run never finished, or it ran another release. Independent of the records' order."""
    out: dict[tuple, str] = {}
    for key in (cell_key, lambda r: r.cell_id):
        claims: dict = {}
        for i, r in enumerate(recs):
            claims.setdefault(key(r), []).append(sources[i] if sources else f"record {i + 1}")
        for r in recs:
            names = sorted(claims[key(r)])
            if len(names) > 1:
                out.setdefault(cell_key(r), f"{len(names)} records for this cell ({', '.join(names)}); keep one")
    for r in recs:
        if cell_key(r) in out:
            continue
        if r.status == records.RUNNING:
            out[cell_key(r)] = "never finished (its record still says 'running': killed or still running); re-run it"
        elif not _same_release(r.environment.get("transformers"), r.cell.transformers):
            out[cell_key(r)] = (
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


def _shows(rec: Record) -> bool:
    """The failure shows its rule's signature: the error pattern in "Type: message", or the measured symptom
    (it loaded and ran: its logits are not the reference's, or its KV decode disagrees with no-cache, or they
    are not finite; and, where the record has the fp64 forward, off it by more than the dtype's noise)."""
    exp = rec.expected
    if exp.error is None and exp.symptom is None:  # a record from before signatures: any failure, as then
        return True
    err = rec.error
    if exp.error is not None and err is not None and re.search(exp.error, f"{err.type}: {err.message}"):
        return True
    gap = rec.reference.max_abs_diff if rec.reference else None
    off = gap is None or gap > TOLERANCE.get(rec.cell.dtype, 1e-2)
    wrong = (records.OK, records.Status.GENERATE_MISMATCH, records.Status.NONFINITE_LOGITS)  # it ran, wrongly
    return exp.symptom == WRONG_LOGITS and rec.status in wrong and off


def judge_cell(rec: Record, ref: Reference | None) -> tuple[str, str]:
    """The verdict (one of `VERDICTS`) of one cell's record against its reference, and why."""
    if rec.status.no_evidence:
        return "error", failure(rec)
    if rec.status == records.Status.UNSUPPORTED_PAIR:
        return "unsupported-pair", rec.error.message if rec.error else "transformers does not support this torch"
    if rec.status == records.OK and (ref is None or ref.record is None):  # ran, nothing to compare with
        return "cannot-judge", "no reference cell that ran ok" + (f" ({ref.line})" if ref else "")
    exp = rec.expected
    ok, why = bit_identical(rec, ref.record if ref else None)  # why: the record's own error, or what differs
    if ok:
        strict = exp.outcome == "xfail" and exp.strict
        return ("XPASS", "expected to fail but passed: " + exp.reason) if strict else ("pass", "")
    if exp.outcome == "xfail" and _shows(rec):
        return "expected-fail", f"{why} ({exp.reason})"
    if not exp.strict and rec.status != records.OK and before_reference(rec, ref):
        return "expected-fail", f"{why} (older than transformers {ref.release}, the reference release)"
    if not exp.promised:
        return "expected-fail", f"{why} (unpatched code: nothing promised on this checkpoint)"
    if exp.outcome == "xfail":
        return "FAIL", f"{why} (not the declared failure: {exp.reason})"
    return "FAIL", why


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
    checkpoint: str = SHIPPED  # "" ours; else the `cell --model` label
    error: str | None = None  # the record's own first error line, when it did not run ok

    @property
    def column(self) -> str:
        """The grid's column: the variant for ours, "checkpoint/variant" for a `cell --model` checkpoint."""
        return self.model if self.checkpoint == SHIPPED else f"{self.checkpoint}/{self.model}"

    def to_dict(self) -> dict:
        return {**asdict(self), "overrides": list(self.overrides)}


def _row(r: Record, ref: Record | None, verdict_why: tuple[str, str], trusted: bool) -> Row:
    v, why = verdict_why
    t = r.target if trusted else None
    gen = r.generation.text if trusted and r.generation else None
    c = r.cell
    env = r.environment if trusted else {}  # an untrusted row shows the cell's own fields only
    return Row(
        cell=c.id,
        transformers=c.transformers,
        torch=env.get("torch", c.torch),
        build=c.torch,
        device=_device(c, env),
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
        overrides=(*(env.get("overrides") or ()), *(f"+{x}" for x in env.get("extra_requirements") or ())),
        ambiguous=not trusted,
        checkpoint=c.checkpoint,
        error=failure(r) if r.status != records.OK else None,
    )


def rows(recs: list[Record], sources: list[str] | None = None, release: str | None = None) -> list[Row]:
    """One row per cell id (`judged`'s rows)."""
    return judged(recs, sources, release)[0]


def judged(
    recs: list[Record], sources: list[str] | None = None, release: str | None = None
) -> tuple[list[Row], dict[tuple, Reference]]:
    """One row per cell (`cell_key`; of several records of one cell, an error row showing only the cell's fields,
    the one with the least id), sorted by checkpoint, release, build, dtype, attention and variant order in
    `VARIANTS`, each judged against its reference (`release`: `report --reference-release`); and the references."""
    ambiguous = _ambiguous(recs, sources)
    refs = choose(recs, ambiguous, release)
    order = {m: i for i, m in enumerate(VARIANTS)}
    seen: set[tuple] = set()
    out = []
    for r in sorted(
        recs,
        key=lambda r: (
            r.cell.checkpoint,
            version_key(r.cell.transformers),
            r.cell.torch,
            r.cell.dtype,
            r.cell.attn,
            order.get(r.cell.model, len(order)),
            cell_key(r),
            r.cell.id,
        ),
    ):
        if cell_key(r) in seen:
            continue
        seen.add(cell_key(r))
        ref = refs.get(key_of(r))
        trusted = cell_key(r) not in ambiguous
        row_ref = ref.record if ref else None
        out.append(_row(r, row_ref, judge_cell(r, ref) if trusted else ("error", ambiguous[cell_key(r)]), trusted))
    return out, refs


def same_everywhere(table: list[Row]) -> tuple[list[Row], list[str], list[str]]:
    """A failure identical on every release (two or more) of a (checkpoint, group, variant), the reference
    release included, said once: (the rows with their notes pointing at it, problem lines, notes).

    A user's checkpoint that fails so under one attention (eager: a file without the eager branch; sdpa: a
    file that declares no SDPA support) but has cells of the other that pass is judged under the other: the
    failing cells become expected-fail and the line is a note; without such cells the problem line says
    which attention to try."""
    series: dict[tuple, list[Row]] = {}
    for r in table:
        series.setdefault((r.checkpoint, r.build, r.device, r.dtype, r.attn, r.model), []).append(r)
    lines: dict[tuple, list[str]] = {}  # (checkpoint, group, error, attention judged under or None) -> variants
    changed: dict[str, Row] = {}
    for (checkpoint, build, device, dtype, attn, model), members in series.items():
        errors = {r.error and re.sub(r" \(/[^()]*\)", "", r.error) for r in members}  # each release's env path
        if len(members) < 2 or any(r.status != "FAIL" for r in members) or len(errors) != 1 or None in errors:
            continue
        (error,) = errors
        other = OTHER_ATTENTION.get(attn)
        runs = (checkpoint, build, device, dtype, other, model, "pass")
        judged_under = other if checkpoint != SHIPPED and other and any(
            (o.checkpoint, o.build, o.device, o.dtype, o.attn, o.model, o.status) == runs for o in table
        ) else None  # fmt: skip
        group = f"{build} torch, {members[0].device}, {dtype}, {attn}"
        lines.setdefault((checkpoint, group, error, judged_under), []).append(model)
        for r in members:
            if judged_under:
                why = f"{r.error} (fails so on every release under {attn}; runs under {judged_under}: judged there)"
                changed[r.cell] = replace(r, status="expected-fail", why=why)
            else:
                changed[r.cell] = replace(r, why=f"{r.error} (the same on every release: see Problems)")
    problems, notes = [], []
    for (checkpoint, group, error, judged_under), models in lines.items():
        head = f"{checkpoint_name(checkpoint)}, {', '.join(models)} ({group}): fails the same way on every release"
        attn = group.rsplit(", ", 1)[1]
        if judged_under:
            notes.append(f"{head} under {attn}: {error}; runs under {judged_under}, judged there")
        else:
            hint = f"; try --attn {OTHER_ATTENTION[attn]}" if attn in OTHER_ATTENTION else ""
            problems.append(f"{head}: {error}{hint}")
    return [changed.get(r.cell, r) for r in table], problems, notes


def _device(cell: records.CellInfo, environment: dict) -> str:
    """'cpu', or the GPU's name as the capture saw it (e.g. 'cuda: NVIDIA H100 80GB HBM3')."""
    name = environment.get("device_name")
    return f"{cell.device}: {name}" if cell.device != "cpu" and name else cell.device


def group_name(r: Row) -> str:
    return f"{r.build} torch, {r.device}, {r.dtype}, {r.attn}"


def grid(table: list[Row]) -> dict[str, dict[str, dict[str, str]]]:
    """group ('cpu torch, cpu, float32, eager') -> release -> column (`Row.column`) -> verdict or 'missing'."""
    cols = columns(table)
    out: dict[str, dict[str, dict[str, str]]] = {}
    for r in table:
        out.setdefault(group_name(r), {})
    for name in out:
        members = [r for r in table if group_name(r) == name]
        releases = sorted({r.transformers for r in members}, key=version_key)
        out[name] = {v: dict.fromkeys(cols, MISSING) for v in releases}
        for r in members:
            out[name][r.transformers][r.column] = r.status
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
    references: list[str] = field(default_factory=list)  # which reference release each checkpoint used, and why
    notes: list[str] = field(default_factory=list)  # said once, not a problem (e.g. judged under sdpa)
    torch_table: list = field(default_factory=list)  # `torch_table.TorchRow`s: each torch against the pinned one
    torch_notes: list[str] = field(default_factory=list)  # which differences are torch's

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
