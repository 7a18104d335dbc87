"""Diagnosing two matrix cells: their per-release envs, their models hotfixed as the matrix does, then the driver.

`diagnose` turns two cells into two `driver.Side`s: it builds (or reuses) each cell's env, picks the
checkpoint each cell runs and hotfixes it per model variant (in this process) through the matrix's hotfix
cache (`matrix.hotfix_cache.hotfix_once`), so a pair diagnosed again, or one a sweep already ran, is not
hotfixed again. Also the CLI's `diagnose` subcommand. No torch or transformers here: those run in the sides' envs.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from opensci_patch._util.defaults import DEFAULT_PROMPT, FIXTURE_DIR
from opensci_patch._util.errors import OpensciPatchError
from opensci_patch._util.options import kwargs_from
from opensci_patch._util.procs import tail
from opensci_patch.diagnose.decode import DEFAULT_DECODE_STEPS
from opensci_patch.diagnose.driver import DiagnoseError, Log, Side, compare_sides
from opensci_patch.diagnose.stages import MARKER, RESULT, fresh_dir, prepare_out, write_json
from opensci_patch.matrix.spec import DEFAULT_TORCH_BUILD, TORCH_BUILDS, VARIANTS, Cell
from opensci_patch.measure.input_checks import validate_model_dir

Cells = tuple[tuple[str, Cell], tuple[str, Cell]]  # (("A", cell a), ("B", cell b))


def _describe(cell: Cell, model_dir: Path | None = None) -> str:
    return (
        f"transformers {cell.transformers} (torch {cell.torch}), {cell.model}, {cell.dtype}, {cell.attn} attention"
        + (f", model {model_dir}" if model_dir is not None else "")
    )


def _check_inputs(cells: Cells, sources: dict[str, Path], model_dir_b: Path | None) -> None:
    """Refuse unreadable model dirs, unknown variants and a checkpoint given to a variant that runs its own."""
    for source in set(sources.values()):
        validate_model_dir(source)
    for label, cell in cells:
        if cell.model not in VARIANTS:
            raise OpensciPatchError(f"unknown model variant {cell.model!r}: choose one of {', '.join(VARIANTS)}")
        if VARIANTS[cell.model].own_checkpoint and sources[label] != FIXTURE_DIR:
            option = "--model" if label == "A" or model_dir_b is None else "--model-b"
            raise OpensciPatchError(f"{cell.model!r} runs the shipped weights under generated code; drop {option}")


def _envs_and_checkpoints(
    cells: Cells, sources: dict[str, Path], env_root: Path | None, log: Log
) -> tuple[dict[tuple[str, str], Any], dict[str, Path]]:
    """Each cell's env, by (release, torch build), and the checkpoint each cell runs (before any hotfix).

    Bad versions and install failures stop here, before anything is written.
    """
    from opensci_patch.matrix.envs import ensure_env

    envs = {}
    runs_on = dict(sources)
    for label, cell in cells:
        key = (cell.transformers, cell.torch)
        if key not in envs:
            envs[key] = ensure_env(cell.transformers, cell.torch, root=env_root, log=log)
        if VARIANTS[cell.model].own_checkpoint:  # the same checkpoint the matrix runs (runner.hotfix_variants)
            from opensci_patch.fixtures.own import ensure_checkpoint

            runs_on[label] = ensure_checkpoint(VARIANTS[cell.model].checkpoint, env_root, log=log)
    return envs, runs_on


def _hotfixed_model(cell: Cell, label: str, source: Path, workdir: Path, env_root: Path | None, keep: bool,
                   log: Log) -> Path:  # fmt: skip
    """The model dir `cell` runs: `source` hotfixed as the matrix does, through the matrix's hotfix cache.

    `hotfix_cache.hotfix_once` is the one definition of a variant's hotfix and the one cache of its outputs, so
    diagnose cannot drift from what the matrix runs, and never hotfixes what a sweep or an earlier diagnose of
    this same code already hotfixed. A miss is hotfixed in this process under `workdir`; a hit runs from the
    cache (copied under `workdir` when `keep`).
    """
    from opensci_patch.matrix.hotfix_cache import hotfix_dir, hotfix_once

    if VARIANTS[cell.model].hotfix is None:
        return source
    got = hotfix_once([(cell.model, source)], env_root, workdir, log)[(cell.model, source)]
    if not isinstance(got, Path):
        raise DiagnoseError(f"hotfix ({cell.model}) for {label} failed:\n{tail(got, 15)}")
    if got.is_relative_to(workdir):
        log(f"hotfixed ({cell.model}) into {got}")
    if keep and not got.is_relative_to(workdir):  # a cache hit: the kept models are under OUT/models all the same
        kept = hotfix_dir(workdir, source, cell.model)
        log(f"copying the cached hotfix ({cell.model}) to {kept}")
        shutil.copytree(got, kept)
        return kept
    return got


def _prepare_models(
    cells: Cells, runs_on: dict[str, Path], models_root: Path, env_root: Path | None, keep: bool, log: Log
) -> dict[str, Path]:
    """The model dir each cell runs: one hotfix per variant and checkpoint, each in its own dir under `models_root`."""
    prepared: dict[tuple[str, Path], Path] = {}
    models: dict[str, Path] = {}
    for label, cell in cells:
        key = (cell.model, runs_on[label])
        if key not in prepared:
            workdir = models_root / (label + "-" + "".join(c if c.isalnum() or c in "_.-" else "_" for c in cell.model))
            prepared[key] = _hotfixed_model(cell, label, runs_on[label], workdir, env_root, keep, log)
        models[label] = prepared[key]
    return models


def diagnose(
    a: Cell,
    b: Cell,
    model_dir: Path | None = None,
    out_dir: Path = Path("diagnose"),
    *,
    model_dir_b: Path | None = None,
    prompt: str = DEFAULT_PROMPT,
    reference: str = "auto",
    env_root: Path | None = None,
    keep_models: bool = False,
    decode_steps: int = DEFAULT_DECODE_STEPS,
    timeout: float = 900.0,
    log: Log = print,
) -> dict:
    """Name the first stage (or decode step) where cells `a` and `b` disagree on `model_dir`, and the likely cause.

    Each cell runs in its own per-release env (built on first use). The model dir (B's is
    `model_dir_b` when given) is prepared per model variant with the matrix's hotfix, in this process,
    once per version of this code and of the checkpoint's files: through the matrix's hotfix cache
    under the env root. What a run hotfixes goes under `out_dir/models/`, removed
    afterwards unless `keep_models`; the user's dirs are only read. Returns the result dict (also
    `out_dir/diagnose.json`): `status` is "diverged", "agree" or "error" (a side failed to load or
    run: a finding, with the error).
    """
    model_dir = Path(model_dir or FIXTURE_DIR).absolute()
    sources = {"A": model_dir, "B": Path(model_dir_b).absolute() if model_dir_b else model_dir}
    cells: Cells = (("A", a), ("B", b))
    _check_inputs(cells, sources, model_dir_b)
    out_dir = Path(out_dir).absolute()
    envs, runs_on = _envs_and_checkpoints(cells, sources, env_root, log)
    prepare_out(out_dir)
    models_root = out_dir / "models"
    if any(VARIANTS[c.model].hotfix is not None for _, c in cells):
        fresh_dir(models_root)
    t0 = time.monotonic()
    try:
        models = _prepare_models(cells, runs_on, models_root, env_root, keep_models, log)
        sides = [
            Side(
                label,
                envs[(c.transformers, c.torch)].python,
                models[label],
                _describe(c, sources[label] if model_dir_b else None),
                c.dtype,
                c.attn,
                c.device,
            )
            for label, c in cells
        ]
        prepare_s = round(time.monotonic() - t0, 1)
        result = compare_sides(
            sides[0],
            sides[1],
            out_dir,
            prompt=prompt,
            reference=reference,
            reference_model=model_dir,
            decode_steps=decode_steps,
            timeout=timeout,
            log=log,
        )
    finally:
        if not keep_models and (models_root / MARKER).exists():
            shutil.rmtree(models_root)
    result["cells"] = {label: asdict(c) | {"id": c.id} for label, c in cells}
    result["model_dir"] = str(model_dir)
    if model_dir_b:
        result["model_dir_b"] = str(sources["B"])
    result["timings"]["prepare_s"] = prepare_s
    write_json(out_dir / RESULT, result)
    return result


# ---------------------------------------------------------------------------------------------
# the CLI's `diagnose` subcommand (cli.py attaches these to its subparser)


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `opensci-patch diagnose A B` (for cli.py to attach to its subparser)."""
    p.add_argument("a", metavar="A", help="cell, e.g. 4.57.6:structural or tf4.57.6-cpu-structural-float32-eager")
    p.add_argument("b", metavar="B", help="cell, e.g. 5.2.0:structural (fields: variant, torch build, dtype, attn)")
    p.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: the shipped fixture)")
    p.add_argument(
        "--model-b",
        type=Path,
        default=None,
        help="checkpoint dir for B only (default: --model), e.g. a modified copy to compare with the original",
    )
    p.add_argument("--out", type=Path, default=Path("diagnose"), help="output dir (default: ./diagnose)")
    p.add_argument(
        "--torch",
        default=DEFAULT_TORCH_BUILD,
        choices=list(TORCH_BUILDS),
        help="torch build for cells that do not name one",
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument(
        "--reference",
        choices=["auto", "on", "off"],
        default="auto",
        help="fp64 reference forward (auto: checkpoints up to 1 GiB)",
    )
    p.add_argument(
        "--decode-steps",
        type=int,
        default=DEFAULT_DECODE_STEPS,
        help=f"greedy decode steps checked when the forward agrees (default {DEFAULT_DECODE_STEPS}; 0: off)",
    )
    p.add_argument("--env-root", type=Path, default=None, help="where the per-release envs live")
    p.add_argument("--keep-models", action="store_true", help="keep the hotfixed model dirs under OUT/models")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Exit 0: the cells agree; 1: they diverge, or a side failed to load or run (both in diagnose.json)."""
    if args.decode_steps < 0:
        raise OpensciPatchError(f"--decode-steps must be 0 (off) or more, not {args.decode_steps}")
    import dataclasses

    from opensci_patch.matrix import releases, spec

    a, b = (Cell.parse(text, torch_build=args.torch) for text in (args.a, args.b))
    a, b = (dataclasses.replace(c, transformers=releases.canonical(c.transformers, pre=True)) for c in (a, b))
    releases.check_known([a.transformers, b.transformers], spec.TRANSFORMERS_VERSIONS, root=args.env_root)
    result = diagnose(
        a,
        b,
        args.model,
        args.out,
        model_dir_b=args.model_b,
        **kwargs_from(args, "prompt", "reference", "env_root", "keep_models", "decode_steps", "timeout"),
        log=lambda m: print(m, flush=True),
    )
    return 0 if result["status"] == "agree" else 1
