"""The report's pictures (release x variant grid, " Paris" logit per release) and the row/column order they share
with the report's tables.

Kept apart from `report` so the verdict logic reads without matplotlib code, and so matplotlib stays optional
(the [plot] extra): every picture function returns False when it is missing and the report says so. This module
imports nothing from `report`; `report` imports it.
"""

from __future__ import annotations

import io
from pathlib import Path

from packaging.version import InvalidVersion, Version

from opensci_patch._util import fs
from opensci_patch.matrix.spec import VARIANTS

MISSING = "missing"
GRID_COLOURS = {
    "pass": "#4caf50",
    "expected-fail": "#b0bec5",
    "FAIL": "#e53935",
    "XPASS": "#ff9800",
    "error": "#8e24aa",
    "cannot-judge": "#fff176",
    "unsupported-pair": "#90caf9",
    MISSING: "#ffffff",
}


def version_key(v: str) -> tuple:
    """Release order (5.10 after 5.9, rc before final); unparsable strings last, by text."""
    try:
        return (0, Version(v), "")
    except InvalidVersion:
        return (1, Version("0"), v)


def columns(table: list) -> list[str]:
    """The grid's columns (`Row.column`): ours first, every variant of `matrix.VARIANTS` then any other a record
    names; then each `cell --model` checkpoint's variants ("checkpoint/variant"), in `VARIANTS` order."""
    order = {m: i for i, m in enumerate(VARIANTS)}
    ours = {r.model for r in table if not r.checkpoint}
    out = [*VARIANTS, *sorted(ours - set(VARIANTS))] if ours else []
    theirs = {(r.checkpoint, r.model): r.column for r in table if r.checkpoint}
    return out + [theirs[k] for k in sorted(theirs, key=lambda k: (k[0], order.get(k[1], len(order)), k[1]))]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def paris_series(table: list) -> list[tuple[str, str, list[tuple[int, float]]]]:
    """(column, marker, [(release index, " Paris" logit)]) for every grid column, CPU cells only."""
    versions = sorted({r.transformers for r in table}, key=version_key)
    marker_cycle = "v<>pP*hH"  # for variants a record names but `VARIANTS` does not declare
    model_of = {r.column: r.model for r in table}
    return [
        (
            column,
            VARIANTS[model_of.get(column, column)].marker
            if model_of.get(column, column) in VARIANTS
            else marker_cycle[i % len(marker_cycle)],
            [
                (versions.index(r.transformers), r.paris_logit)
                for r in table
                if r.column == column and r.paris_logit is not None and r.device == "cpu"
            ],
        )
        for i, column in enumerate(columns(table))
    ]


def plot(table: list, path: Path) -> bool:
    """The " Paris" logit per release and variant (CPU cells). False when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    versions = sorted({r.transformers for r in table}, key=version_key)
    fig, ax = plt.subplots(figsize=(max(8, 0.35 * len(versions)), 4))
    for model, marker, pts in paris_series(table):
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, linestyle="", label=model, markersize=8)
        else:
            ax.plot([], [], marker=marker, linestyle="", label=f"{model} (no logits)")
    ax.set_xticks(range(len(versions)), versions, rotation=60 if len(versions) > 10 else 30)
    ax.set_ylabel('logit of " Paris"')
    ax.set_title('"The capital of France is" -> " Paris", CPU')
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fs.write_atomic(path, _png(fig, plt))
    return True


def plot_grid(cells: dict[str, dict[str, dict[str, str]]], new: set[str], path: Path) -> bool:
    """A picture of the release x variant grid(s), one panel per group. False when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    from matplotlib.colors import to_rgb

    n_rows = sum(len(g) for g in cells.values())
    n_cols = max(len(next(iter(g.values()))) for g in cells.values())  # wide enough for one label a column
    fig, axes = plt.subplots(
        len(cells),
        1,
        figsize=(max(8, 1.4 * n_cols), 1.2 + 0.32 * n_rows + 0.6 * len(cells)),
        squeeze=False,
        constrained_layout=True,
    )
    for ax, (name, g) in zip(axes[:, 0], cells.items(), strict=True):
        releases = list(g)
        cols = list(next(iter(g.values())))
        image = [[to_rgb(GRID_COLOURS[g[v][c]]) for c in cols] for v in releases]
        ax.imshow(image, aspect="auto")
        for y, v in enumerate(releases):
            for x, c in enumerate(cols):
                ax.text(x, y, g[v][c], ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(cols)), cols)
        ax.xaxis.tick_top()
        ax.set_yticks(range(len(releases)), [f"{v} (new)" if v in new else v for v in releases])
        ax.set_xticks([x - 0.5 for x in range(1, len(cols))], minor=True)
        ax.set_yticks([y - 0.5 for y in range(1, len(releases))], minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="minor", length=0)
        ax.set_title(name, fontsize=9, pad=18)
    fs.write_atomic(path, _png(fig, plt))
    return True
