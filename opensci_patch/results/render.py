"""A `Report` rendered twice: matrix.md (grids first, then problems, changes and the detail table) and
summary.json (the same counts, problems, grid and rows, as JSON)."""

from __future__ import annotations

import math

from tabulate import tabulate

from opensci_patch.matrix.spec import REFERENCE
from opensci_patch.results.judge import BAD, Report, Row, group_name
from opensci_patch.results.plot import version_key


def md_text(value) -> str:
    """A value from a record (or a file name, or the previous summary) as inert markdown text on one line: the
    one escaping of everything matrix.md shows that the tool did not write itself. Lines are joined with spaces
    (a message can start no heading, list item or section), `\\` and `|` are backslash-escaped (no cell or
    column of its own making), `&` and `<` become entities (no HTML), and a leading `#` is escaped."""
    text = " ".join(part for part in (line.strip() for line in str(value).splitlines()) if part)
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    text = text.replace("&", "&amp;").replace("<", "&lt;")
    return "\\" + text if text.startswith("#") else text


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
    ("model", lambda r: r.column),
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
    ("note", lambda r: r.why[:160]),
)


def markdown_table(table: list[Row]) -> str:
    body = [[md_text(show(r)) for _, show in DETAIL_COLUMNS] for r in table]
    return tabulate(body, headers=[h for h, _ in DETAIL_COLUMNS], tablefmt="github")


def markdown_grid(cells: dict[str, dict[str, str]], new: set[str], overrides: dict[str, str] | None = None) -> str:
    """One row per release, one column per variant; a release new since the last summary says so, and a release
    whose env was built with dependency overrides names them (`overrides`: release -> "kernels>=0.17")."""
    cols = next(iter(cells.values())).keys() if cells else []
    overrides = overrides or {}

    def label(v: str) -> str:
        return (f"{v} (new)" if v in new else v) + (f" (override {overrides[v]})" if v in overrides else "")

    body = [[md_text(label(v)), *(md_text(cells[v][c]) for c in cols)] for v in cells]
    return tabulate(body, headers=["transformers", *(md_text(c) for c in cols)], tablefmt="github")


def changes(table: list[Row], previous: dict[str, str]) -> list[str]:
    """Cells whose verdict moved since the last written report: newly broken first."""
    broken, fixed, other = [], [], []
    for r in table:
        old = previous.get(r.cell)
        if old is None or old == r.status:
            continue
        line = f"- `{md_text(r.cell)}`: {md_text(old)} -> **{md_text(r.status)}** {md_text(r.why)}"
        (broken if r.status in BAD else fixed if old in BAD else other).append(line)
    out = []
    if broken:
        out += ["### Newly broken", *broken]
    if fixed:
        out += ["### Newly fixed", *fixed]
    if other:
        out += ["### Other changes", *other]
    return out


def torch_section(rep: Report) -> list[str]:
    """matrix.md's torch table: per transformers release, each torch release's cells against the pinned torch's."""
    if not rep.torch_table:
        return []
    heads = ["transformers", "torch", "vs", "dtype", "attn", "model", "bit-identical", "max abs diff top-k",
             "first differing decode step", "greedy ids equal", "fp64 gap (this / pinned)"]  # fmt: skip
    body = [[md_text(x) for x in (t.transformers, t.torch, t.pinned, t.dtype, t.attn,
             t.model if not t.checkpoint else f"{t.checkpoint}/{t.model}", _fmt(t.bit_identical, ""),
             _fmt(t.max_abs_diff, ".2e"), _fmt(t.first_step, "d"), _fmt(t.greedy_equal, ""),
             f"{_fmt(t.fp64_gap, '.2e')} / {_fmt(t.pinned_fp64_gap, '.2e')}")] for t in rep.torch_table]  # fmt: skip
    notes = [f"- {md_text(n)}" for n in rep.torch_notes]
    return ["## Torch releases against the pinned torch", "", tabulate(body, headers=heads, tablefmt="github"), "",
            *notes, *([""] if notes else [])]  # fmt: skip


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
            "references": rep.references,
            "notes": rep.notes,
            "counts": rep.counts,
            "problems": rep.problem_lines(),
            "releases": sorted({r.transformers for r in rep.table}, key=version_key),
            "new_releases": rep.new_releases,
            "grid": rep.grid,
            "verdicts": {r.cell: r.status for r in rep.table},
            "rows": [r.to_dict() for r in rep.table],
            "torch_table": [t.to_dict() for t in rep.torch_table],
            "torch_notes": rep.torch_notes,
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
        lines += [f"New releases since the last summary: {md_text(', '.join(rep.new_releases))} (marked `(new)`).", ""]
    for name, cells in rep.grid.items():
        if len(rep.grid) > 1:
            lines += [f"Torch build, device, dtype and attention: {md_text(name)}", ""]  # a record's text: no heading
        overridden: dict[str, str] = {}
        for r in rep.table:
            if r.overrides and group_name(r) == name:
                seen = overridden.get(r.transformers, "").split("; ") if r.transformers in overridden else []
                overridden[r.transformers] = "; ".join(dict.fromkeys([*seen, ", ".join(r.overrides)]))
        lines += [markdown_grid(cells, set(rep.new_releases), overridden), ""]
    if any(r.status == "unsupported-pair" for r in rep.table):
        lines += ["`unsupported-pair`: the transformers release does not support that torch (its own requirement, in "
                  "the note); a declared fact, not a result about the model, and not counted in the exit status.", ""]
    if grid_png:
        lines += ["![release x variant grid](matrix_grid.png)", ""]
    else:
        lines += ["(No grid picture: matplotlib is not installed; `pip install opensci-patch[plot]`.)", ""]
    lines += torch_section(rep)
    if rep.problem_lines():
        lines += ["## Problems (exit status 1)", "", *(f"- {md_text(p)}" for p in rep.problem_lines()), ""]
    if rep.notes:
        lines += ["## Notes", "", *(f"- {md_text(n)}" for n in rep.notes), ""]
    moved = changes(rep.table, rep.previous or {})
    if moved:
        lines += ["## Changes since the last report", "", *moved, ""]
    lines += [
        "## Detail",
        "",
        "Each cell is compared with its reference cell: the same checkpoint and reference variant, torch build, "
        "device, dtype and attention, on the reference release below; decode step 0 is generate's prompt forward "
        "(compared as the first logits).",
        "",
        *(f"- {md_text(line)}" for line in rep.references),
        "",
        markdown_table(rep.table),
        "",
    ]
    if paris_png:
        lines += ['![" Paris" logit per release](paris_logit.png)', ""]
    return "\n".join(lines)
