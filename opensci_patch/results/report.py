"""Matrix records -> a release x variant grid, the detail table, pictures, summary.json, and an exit status.

The jobs, one module each: `judge` gives each cell its verdict against what it declared and its reference
cell (the rules are listed there) and makes the rows; `render` writes matrix.md and summary.json from one
`Report` value, so they cannot disagree; `pair` writes the two into the results directory with one run id;
`plot` draws the pictures. This module reads the inputs and runs them in order.

The report refuses ambiguity rather than guessing: records are read only through `records.load`;
a file it refuses, a duplicate cell and an unfinished cell are listed under "Problems" in both
matrix.md and summary.json and make the exit status non-zero, as FAIL, XPASS and error do.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

from opensci_patch._util.errors import DestinationError, OpensciPatchError
from opensci_patch.measure import records
from opensci_patch.measure.records import Record, RecordError
from opensci_patch.results.judge import Report, grid, judged, same_everywhere
from opensci_patch.results.pair import check_pair, check_results_dir, write_run
from opensci_patch.results.plot import plot, plot_grid, version_key
from opensci_patch.results.reference import broken_decode
from opensci_patch.results.render import matrix_markdown, summary_json
from opensci_patch.results.torch_table import torch_notes, torch_rows


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


def build(loaded: Loaded, previous: dict | None, reference_release: str | None = None) -> Report:
    """The report of what was loaded, against the previous summary (for new releases and moved verdicts);
    every cell compared with `reference_release`'s, or by default with the oldest release where its reference runs."""
    table, refs = judged(loaded.records, loaded.sources, reference_release)
    table, same, notes = same_everywhere(table)
    releases = sorted({r.transformers for r in table}, key=version_key)
    new = [v for v in releases if v not in set(previous["releases"])] if previous is not None else []
    trusted = [r for r in loaded.records if not any(row.ambiguous and row.cell == r.cell.id for row in table)]
    torches = torch_rows(trusted)
    return Report(
        table=table,
        problems=[*loaded.problems, *broken_decode(loaded.records, refs, reference_release), *same],
        grid=grid(table),
        new_releases=new,
        previous=previous["verdicts"] if previous is not None else None,
        n_records=len(loaded.records) + len(loaded.problems),
        references=[ref.line for ref in refs.values()],
        notes=notes,
        torch_table=torches,
        torch_notes=torch_notes(torches),
    )


def read_previous(summary_path: Path) -> dict | None:
    """The committed summary.json: {"verdicts": {cell id: verdict}, "releases": [...]}, or None if absent.

    A corrupt one is an error (exit 2): the "newly broken" and "new release" lines depend on it.
    """
    if not summary_path.exists():
        return None
    todo = "restore it (git checkout -- results/summary.json) or delete it"
    if not summary_path.is_file():  # never opened: a FIFO would block
        raise OpensciPatchError(f"{summary_path}: not a regular file; {todo}")
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


def write_report(
    records_dir: Path,
    results_dir: Path,
    *,
    title: str = "Cross-version matrix",
    machine: str | None = None,
    log=print,
    reference_release: str | None = None,
) -> int:
    """Write matrix.md, summary.json and the pictures; return the number of bad cells plus refused files.

    `reference_release` (`report --reference-release`): the release every cell is compared with; one no
    record ran is refused (exit 2)."""
    results_dir = Path(results_dir)
    if results_dir.resolve() == Path(records_dir).resolve():
        raise DestinationError(
            f"{results_dir}: --results is the --records directory (its summary.json would be read as a record); "
            "pass another --results"
        )
    check_results_dir(results_dir)
    summary_path = results_dir / "summary.json"
    mixed = check_pair(results_dir)
    if mixed:
        log(mixed)
    previous = read_previous(summary_path)
    loaded = load_records(records_dir)
    if not loaded.records and not loaded.problems:
        raise OpensciPatchError(f"{records_dir}: no cell records; run `nox -s matrix` first")
    if reference_release is not None:
        from opensci_patch.matrix.releases import canonical

        reference_release = canonical(reference_release, what="--reference-release", pre=True)
        ran = sorted({r.cell.transformers for r in loaded.records}, key=version_key)
        if reference_release not in ran:
            raise OpensciPatchError(
                f"--reference-release {reference_release}: no cell record of that release in {records_dir} "
                f"(there are: {', '.join(ran) or 'none'})"
            )
    rep = build(loaded, previous, reference_release)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine or f"{platform.machine()}, {platform.platform()}, python {platform.python_version()}"
    grid_png = plot_grid(rep.grid, set(rep.new_releases), results_dir / "matrix_grid.png") if rep.grid else False
    if not grid_png and rep.grid:
        log("matplotlib is not installed: no matrix_grid.png / paris_logit.png (pip install opensci-patch[plot])")
    paris_png = plot(rep.table, results_dir / "paris_logit.png") if grid_png else False
    text = matrix_markdown(rep, title=title, date=date, machine=machine, grid_png=grid_png, paris_png=paris_png)
    write_run(results_dir, text, summary_json(rep, date, machine))
    log(
        f"wrote {results_dir / 'matrix.md'} ({len(rep.table)} cells; "
        + ", ".join(f"{k} {v}" for k, v in rep.counts.items())
        + (f"; {len(rep.problem_lines())} problem(s)" if rep.problem_lines() else "")
        + ")"
    )
    return rep.bad
