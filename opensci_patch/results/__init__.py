"""Layer 4, what the records say: `verdict` holds the three "matches the reference" rules side by side,
`report` turns a records directory into the grid, tables, summary.json and an exit status (`judge` gives
each cell its verdict and row, `render` writes matrix.md and summary.json, `pair` writes them with one run id,
`plot` draws the pictures), and `bisect` finds the first release that leaves the fp64 reference by running
cells through `matrix.runner`. Uses every layer below it, never `diagnose` or the CLI."""

__all__ = ["bisect", "judge", "pair", "plot", "render", "report", "verdict"]
