"""Matrix records -> a release x variant grid, the detail table, pictures, summary.json, and an exit status.

A cell's verdict compares what happened with what the cell declared (`matrix.expectation`):

- pass: expected to pass, ran, and its first logits, every decode step's logits and its greedy
  tokens are bit-identical to the reference cell's (same torch build, device, dtype, attention);
- expected-fail: expected to fail (strict xfail) and failed;
- FAIL: expected to pass and did not (model error, KV-cache self-check failed, wrong answer, or not
  bit-identical: the first differing decode step is named);
- XPASS: expected to fail but passed: upstream changed, the expectation must be updated;
- cannot-judge: ran to the end, but there is no reference cell (that ran ok) to compare it with;
- error: the cell could not run (environment install, crash, hotfix failure), never finished
  (its placeholder record says "running"), or is ambiguous (two records for one cell id).

The report refuses ambiguity rather than guessing: records are read only through `records.load`;
a file it refuses, a duplicate cell and an unfinished cell are listed under "Problems" in both
matrix.md and summary.json and make the exit status non-zero, as FAIL, XPASS and error do. The
reference cell of a group is its one finished `matrix.REFERENCE` record: unique by construction,
so never chosen by file-name order. matrix.md and summary.json are rendered from one `Report`
value, so they cannot disagree.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tabulate import tabulate

from opensci_patch._util import fs
from opensci_patch._util.errors import DestinationError, OpensciPatchError
from opensci_patch._util.faults import fault_point
from opensci_patch.matrix.spec import REFERENCE, VARIANTS
from opensci_patch.measure import records
from opensci_patch.measure.records import Record, RecordError
from opensci_patch.results.plot import MISSING, plot, plot_grid, variants, version_key
from opensci_patch.results.verdict import bit_identical, failure, first_step_difference, shown_values_differ

BAD = ("FAIL", "XPASS", "error", "cannot-judge")
VERDICTS = ("pass", "expected-fail", "FAIL", "XPASS", "error", "cannot-judge")


@dataclass
class Loaded:
    """What a records directory holds: the records `load` accepted (with their file names) and the refusals."""

    records: list[Record] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def load_records(records_dir: Path) -> Loaded:
    """Every `*.json` in the directory through `records.load`; a refused file becomes a problem line."""
    records_dir = Path(records_dir)
    if not records_dir.is_dir():
        raise OpensciPatchError(f"{records_dir}: no such records directory; run `nox -s matrix` (or pass --records)")
    out = Loaded()
    for path in sorted(records_dir.glob("*.json")):
        try:
            rec = records.load(path)
        except RecordError as exc:
            out.problems.append(str(exc))
            continue
        if rec.cell is None:
            out.problems.append(f"{path}: a capture record, not a matrix cell record (no cell); move it out of here")
            continue
        if rec.expected is None:
            out.problems.append(f"{path}: cell record without an expected outcome; re-run the cell")
            continue
        out.records.append(rec)
        out.sources.append(path.name)
    return out


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
        fp64_ref_diff=r.reference.max_abs_diff if trusted and r.reference else None,
        greedy=(gen[:40] + "...") if gen and len(gen) > 40 else gen,
        why=why,
        overrides=tuple(r.environment.get("overrides") or ()),
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


def _group_name(r: Row) -> str:
    return f"{r.build} torch, {r.device}, {r.dtype}, {r.attn}"


def grid(table: list[Row]) -> dict[str, dict[str, dict[str, str]]]:
    """group ('cpu torch, cpu, float32, eager') -> release -> variant -> verdict or 'missing'."""
    cols = variants(table)
    out: dict[str, dict[str, dict[str, str]]] = {}
    for r in table:
        out.setdefault(_group_name(r), {})
    for name in out:
        members = [r for r in table if _group_name(r) == name]
        releases = sorted({r.transformers for r in members}, key=version_key)
        out[name] = {v: dict.fromkeys(cols, MISSING) for v in releases}
        for r in members:
            out[name][r.transformers][r.model] = r.status
    return out


def _fmt(x, spec: str) -> str:
    if x is None:
        return "-"
    if x == float("inf"):
        return "top-10 differs"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return format(x, spec)


# the detail table: (header, how a row shows in it); one list, so headers and cells cannot drift apart
DETAIL_COLUMNS = (
    ("transformers", lambda r: r.transformers),
    ("torch", lambda r: r.torch),
    ("device", lambda r: r.device),
    ("dtype", lambda r: r.dtype),
    ("attn", lambda r: r.attn),
    ("model", lambda r: r.model),
    ("status", lambda r: r.status),
    ('" Paris" logit', lambda r: _fmt(r.paris_logit, ".4f")),
    ("rank", lambda r: _fmt(r.rank, "d")),
    ("top-1", lambda r: repr(r.top1) if r.top1 else "-"),
    ("max abs diff top-10 vs ref", lambda r: _fmt(r.top10_max_diff, ".2e")),
    ("bit-identical", lambda r: _fmt(r.bit_identical, "")),
    ("decode steps vs ref", lambda r: r.decode_steps or "-"),
    ("max abs diff vs fp64 ref", lambda r: _fmt(r.fp64_ref_diff, ".2e")),
    ("greedy completion", lambda r: repr(r.greedy) if r.greedy else "-"),
    ("overrides", lambda r: ", ".join(r.overrides) or "-"),
    ("note", lambda r: _cell_text(r.why[:160])),
)


def markdown_table(table: list[Row]) -> str:
    body = [[show(r) for _, show in DETAIL_COLUMNS] for r in table]
    return tabulate(body, headers=[h for h, _ in DETAIL_COLUMNS], tablefmt="github")


def _cell_text(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def markdown_grid(cells: dict[str, dict[str, str]], new: set[str], overrides: dict[str, str] | None = None) -> str:
    """One row per release, one column per variant; a release new since the last summary says so, and a release
    whose env was built with dependency overrides names them (`overrides`: release -> "kernels>=0.17")."""
    cols = next(iter(cells.values())).keys() if cells else []
    overrides = overrides or {}

    def label(v: str) -> str:
        return (f"{v} (new)" if v in new else v) + (f" (override {overrides[v]})" if v in overrides else "")

    body = [[label(v), *(cells[v][c] for c in cols)] for v in cells]
    return tabulate(body, headers=["transformers", *cols], tablefmt="github")


def changes(table: list[Row], previous: dict[str, str]) -> list[str]:
    """Cells whose verdict moved since the last written report: newly broken first."""
    broken, fixed, other = [], [], []
    for r in table:
        old = previous.get(r.cell)
        if old is None or old == r.status:
            continue
        line = f"- `{r.cell}`: {old} -> **{r.status}** {r.why}"
        (broken if r.status in BAD else fixed if old in BAD else other).append(line)
    out = []
    if broken:
        out += ["### Newly broken", *broken]
    if fixed:
        out += ["### Newly fixed", *fixed]
    if other:
        out += ["### Other changes", *other]
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


def build(loaded: Loaded, previous: dict | None) -> Report:
    """The report of what was loaded, against the previous summary (for new releases and moved verdicts)."""
    table = rows(loaded.records, loaded.sources)
    releases = sorted({r.transformers for r in table}, key=version_key)
    new = [v for v in releases if v not in set(previous["releases"])] if previous is not None else []
    return Report(
        table=table,
        problems=[*loaded.problems, *broken_decode(loaded.records)],
        grid=grid(table),
        new_releases=new,
        previous=previous["verdicts"] if previous is not None else None,
        n_records=len(loaded.records) + len(loaded.problems),
    )


def read_previous(summary_path: Path) -> dict | None:
    """The committed summary.json: {"verdicts": {cell id: verdict}, "releases": [...]}, or None if absent.

    A corrupt one is an error (exit 2): the "newly broken" and "new release" lines depend on it.
    """
    if not summary_path.exists():
        return None
    todo = "restore it (git checkout -- results/summary.json) or delete it"
    try:
        data = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OpensciPatchError(f"{summary_path}: unreadable summary ({exc}); {todo}") from None
    verdicts = data.get("verdicts") if isinstance(data, dict) else None
    if not isinstance(verdicts, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in verdicts.items()
    ):
        raise OpensciPatchError(f"{summary_path}: not a report summary (no 'verdicts' of cell -> verdict); {todo}")
    releases = data.get("releases")
    if not (isinstance(releases, list) and all(isinstance(v, str) for v in releases)):
        # summaries before 'releases' was written: the release is the cell id's first field (tf<release>-...)
        releases = sorted({cid.split("-")[0].removeprefix("tf") for cid in verdicts}, key=version_key)
    return {"verdicts": verdicts, "releases": releases}


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def summary_json(rep: Report, date: str, machine: str) -> dict:
    return _jsonable(
        {
            "generated": date,
            "machine": machine,
            "reference": list(REFERENCE),
            "counts": rep.counts,
            "problems": rep.problem_lines(),
            "releases": sorted({r.transformers for r in rep.table}, key=version_key),
            "new_releases": rep.new_releases,
            "grid": rep.grid,
            "verdicts": {r.cell: r.status for r in rep.table},
            "rows": [r.to_dict() for r in rep.table],
        }
    )


def matrix_markdown(rep: Report, *, title: str, date: str, machine: str, grid_png: bool, paris_png: bool) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in rep.counts.items())
    lines = [
        f"# {title}",
        "",
        f"Generated {date} on {machine} from {rep.n_records} record files.",
        "",
        f"Counts: {counts}" + (f"; problems {len(rep.problem_lines())}" if rep.problem_lines() else ""),
        "",
    ]
    if rep.previous is None:
        lines += ["New releases: none marked (no previous summary.json to compare with).", ""]
    elif rep.new_releases:
        lines += [f"New releases since the last summary: {', '.join(rep.new_releases)} (marked `(new)`).", ""]
    for name, cells in rep.grid.items():
        if len(rep.grid) > 1:
            lines += [f"### {name}", ""]
        overridden: dict[str, str] = {}
        for r in rep.table:
            if r.overrides and _group_name(r) == name:
                seen = overridden.get(r.transformers, "").split("; ") if r.transformers in overridden else []
                overridden[r.transformers] = "; ".join(dict.fromkeys([*seen, ", ".join(r.overrides)]))
        lines += [markdown_grid(cells, set(rep.new_releases), overridden), ""]
    if grid_png:
        lines += ["![release x variant grid](matrix_grid.png)", ""]
    else:
        lines += ["(No grid picture: matplotlib is not installed; `pip install opensci-patch[plot]`.)", ""]
    if rep.problem_lines():
        lines += ["## Problems (exit status 1)", "", *(f"- {_cell_text(p)}" for p in rep.problem_lines()), ""]
    moved = changes(rep.table, rep.previous or {})
    if moved:
        lines += ["## Changes since the last report", "", *moved, ""]
    lines += [
        "## Detail",
        "",
        f"Reference cell: transformers {' '.join(REFERENCE)} (same torch build, device, dtype, attention); "
        "decode step 0 is generate's prompt forward (compared as the first logits).",
        "",
        markdown_table(rep.table),
        "",
    ]
    if paris_png:
        lines += ['![" Paris" logit per release](paris_logit.png)', ""]
    return "\n".join(lines)


def _check_results_dir(results_dir: Path) -> None:
    """One line (exit 2) before anything is computed or written, for a path that cannot hold results."""
    if results_dir.exists() and not results_dir.is_dir():
        raise DestinationError(f"{results_dir}: not a directory; pass --results a directory")
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DestinationError(
            f"{results_dir}: cannot create ({exc.strerror or exc}); pass a writable --results"
        ) from None
    if not os.access(results_dir, os.W_OK | os.X_OK):
        raise DestinationError(f"{results_dir}: not writable; pass a writable --results")


JOURNAL = ".report-pending.json"  # the renames a report run has still to make: present = unfinished


@contextlib.contextmanager
def results_lock(results_dir: Path):
    """One report at a time writes into a results directory (fcntl lock on `.report.lock`)."""
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock
        yield
        return
    with open(results_dir / ".report.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_pair(results_dir: Path, files: dict[str, str | dict]) -> None:
    """Write matrix.md and summary.json so that they are always of one run, also after a kill.

    Both go to temp files first; a journal naming the renames is written (atomically) before the first
    rename and removed after the last, so a run killed between the two renames is finished by the next
    one (`finish_pair`), and temp files of a run killed before its journal are removed by it.
    """
    with results_lock(results_dir):
        finish_pair(results_dir)
        renames = []
        try:
            for name, content in files.items():
                tmp = results_dir / f".{name}.{os.getpid()}-{secrets.token_hex(3)}.tmp"
                fs.write_atomic(tmp, content)
                renames.append([tmp.name, name])
            fault_point("report.temps")
            fs.write_atomic(results_dir / JOURNAL, {"renames": renames})
        except BaseException:
            for tmp, _ in renames:
                (results_dir / tmp).unlink(missing_ok=True)
            raise
        finish_pair(results_dir, between=lambda: fault_point("report.renamed-one"))


def finish_pair(results_dir: Path, between=lambda: None) -> None:
    """Make the renames a journal names (a killed run's, or this run's), then drop the journal and any
    temp file of ours that no journal names (a run killed before it wrote its journal). Hold `results_lock`."""
    journal = results_dir / JOURNAL
    try:
        renames = json.loads(journal.read_text())["renames"]
    except FileNotFoundError:
        renames = []
    except (OSError, ValueError, KeyError, TypeError):
        renames = []  # a torn journal cannot be: it is written atomically; treat it as none
    for i, (tmp, name) in enumerate(renames):
        if (results_dir / tmp).is_file():
            os.replace(results_dir / tmp, results_dir / name)
        if i == 0:
            between()
    journal.unlink(missing_ok=True)
    for name in ("matrix.md", "summary.json", JOURNAL):  # ours (.NAME.*.tmp) and write_atomic's of ours
        for leftover in [*results_dir.glob(f".{name}.*.tmp"), *results_dir.glob(f"..{name}.*.tmp")]:
            leftover.unlink(missing_ok=True)


def write_report(
    records_dir: Path, results_dir: Path, *, title: str = "Cross-version matrix", machine: str | None = None, log=print
) -> int:
    """Write matrix.md, summary.json and the pictures; return the number of bad cells plus refused files."""
    results_dir = Path(results_dir)
    _check_results_dir(results_dir)
    summary_path = results_dir / "summary.json"
    with results_lock(results_dir):
        finish_pair(results_dir)  # a killed earlier run: completed or cleaned up before anything is read
    previous = read_previous(summary_path)
    loaded = load_records(records_dir)
    if not loaded.records and not loaded.problems:
        raise OpensciPatchError(f"{records_dir}: no cell records; run `nox -s matrix` first")
    rep = build(loaded, previous)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine or f"{platform.machine()}, {platform.platform()}, python {platform.python_version()}"
    grid_png = plot_grid(rep.grid, set(rep.new_releases), results_dir / "matrix_grid.png") if rep.grid else False
    if not grid_png and rep.grid:
        log("matplotlib is not installed: no matrix_grid.png / paris_logit.png (pip install opensci-patch[plot])")
    paris_png = plot(rep.table, results_dir / "paris_logit.png") if grid_png else False
    run_id = f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
    text = matrix_markdown(rep, title=title, date=date, machine=machine, grid_png=grid_png, paris_png=paris_png)
    text = text.replace("\n\n", f"\n\nReport run `{run_id}` (the same in summary.json).\n\n", 1)
    write_pair(results_dir, {"matrix.md": text, "summary.json": {**summary_json(rep, date, machine), "run_id": run_id}})
    log(
        f"wrote {results_dir / 'matrix.md'} ({len(rep.table)} cells; "
        + ", ".join(f"{k} {v}" for k, v in rep.counts.items())
        + (f"; {len(rep.problem_lines())} problem(s)" if rep.problem_lines() else "")
        + ")"
    )
    return rep.bad
