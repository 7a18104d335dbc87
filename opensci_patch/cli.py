"""The `opensci-patch` command. Thin: parses arguments and delegates to the modules.

Exit codes: 0 success; 1 the model ran into an error that is recorded (e.g. the original
code fails to load); 2 bad input or a refused operation (one line on stderr); 130 Ctrl-C; 143 SIGTERM
(handled as Ctrl-C: the same cleanup runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from opensci_patch import __version__
from opensci_patch._util.defaults import (
    ATTENTION,
    DEFAULT_PROMPT,
    DEFAULT_TARGET,
    DEFAULT_TORCH_BUILD,
    DTYPES,
    FIXTURE_DIR,
    MAX_NEW_TOKENS,
    TORCH_BUILDS,
)
from opensci_patch._util.errors import OpensciPatchError, Terminated, exit_status
from opensci_patch._util.fs import write_atomic
from opensci_patch._util.outputs import check_output_dir, check_output_file
from opensci_patch.matrix.spec import VARIANTS  # stdlib-only module


def _err(msg: str) -> None:
    print(f"opensci-patch: error: {msg}", file=sys.stderr)


def summary_line(record) -> str:
    env = record.environment
    variant = "patched" if record.model["patched"] else "original"
    head = f"transformers {env['transformers']} torch {env['torch']} | {variant}"
    if record.status != "ok" and record.target is None:
        return f"{head} | {record.status}: {record.error.type}: {record.error.message}"
    t = record.target
    line = f"{head} | logit({t.token!r}) = {t.logit:.4f} rank {t.rank}"
    if record.reference:
        ref = record.reference
        gap = f"max|logit-fp64 ref| {ref.max_abs_diff:.2e}" if ref.applicable else f"fp64 ref {ref.not_applicable}"
        line += f" | {gap}"
    if record.generation:
        line += f" | greedy: {record.generation.text!r}"
    if record.status != "ok":
        line += f" | {record.status}: {record.error.type}: {record.error.message}"
    return line


def cmd_fixture(args) -> int:
    source = FIXTURE_DIR
    if args.generated:
        from opensci_patch.fixtures.generated import ensure_generated

        source = ensure_generated(log=lambda m: print(m, flush=True))
    from opensci_patch.demo import write_fixture

    dst = write_fixture(args.dir, args.force, source)
    kind = "generated-style checkpoint (shipped weights, modular-generated code)" if args.generated else "checkpoint"
    print(f"wrote the open-sci fixture {kind} to {dst}")
    return 0


def cmd_hotfix(args) -> int:
    from opensci_patch.rewrite.hotfix import hotfix

    result = hotfix(args.src, args.out, check=args.check, force=args.force, extras=tuple(args.extra), only=args.only)
    if result.refused:  # the other patches applied; what was refused is listed above and in the manifest
        _err(f"{len(result.refused)} construct(s) refused, left as they were: {result.refused[0]}")
    return 1 if result.refused else 0


def cmd_capture(args) -> int:
    from opensci_patch.measure.capture import CaptureSettings, capture
    from opensci_patch.measure.isolation import isolated_hf_cache

    if args.out:
        check_output_file(args.out, args.force)
    settings = CaptureSettings(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        attn=args.attn,
        prompt=args.prompt,
        target=args.target,
        max_new_tokens=args.max_new_tokens,
        shim=args.shim,
        reference=args.reference,
    )
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    with isolated_hf_cache():
        record = capture(settings, log=log)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, record)
    print(summary_line(record))
    if record.status != "ok":
        _err(f"{record.status}: {record.error.type}: {record.error.message}")
        return 1
    return 0


def cmd_demo(args) -> int:
    """The main job on the shipped checkpoint; the verdict compares with the shipped 4.48.0 record."""
    from opensci_patch.demo import run

    return run(args.workdir, args.force, log=lambda m: print(m, flush=True))


def cmd_releases(args) -> int:
    """Print the releases the matrix runs, one per line (the index is asked only for --sweep/--pre/--newest)."""
    from opensci_patch.matrix import releases, spec

    if args.newest:
        print(releases.newest_final(spec.TRANSFORMERS_VERSIONS))
        return 0
    print("\n".join(releases.resolve(spec.TRANSFORMERS_VERSIONS, sweep=args.sweep, pre=args.pre)))
    return 0


def cmd_cell(args) -> int:
    """Run matrix cells (one env per release x torch build; all model variants in it)."""
    from opensci_patch.matrix import releases, spec

    named = [releases.canonical(v, pre=args.pre) for v in args.transformers]  # all refused before any cell runs
    if args.sweep or args.pre or args.all:
        versions = releases.resolve(spec.TRANSFORMERS_VERSIONS, sweep=args.sweep, pre=args.pre)
        versions = sorted(set(versions) | set(named), key=releases.Version)
    else:
        versions = list(dict.fromkeys(named)) or ([spec.REFERENCE[0], max(spec.TRANSFORMERS_VERSIONS,
            key=releases.Version)] if args.torch_sweep else [])  # fmt: skip
    if args.torch_sweep and args.torch:
        raise OpensciPatchError("--torch-sweep picks the torch releases itself: drop --torch")
    if not versions:
        raise OpensciPatchError("name a release with --transformers X (repeatable), or pass --all or --sweep")
    check_output_dir(args.records, "--records")
    releases.check_known(versions, spec.TRANSFORMERS_VERSIONS)
    if args.overrides is not None:  # checked now (exit 2); every env build of this run reads it (envs.ensure_env)
        from opensci_patch.matrix import overrides

        overrides.load(args.overrides)
        os.environ[overrides.VAR] = str(args.overrides.absolute())
    if args.require:  # the same way: every env of this run gets them (its name, marker and records say so)
        from opensci_patch.matrix import overrides

        os.environ[overrides.REQUIRE_VAR] = "\n".join(overrides.requirements(args.require))
    from opensci_patch.matrix.runner import checkpoint_dirs, main_cells

    dirs = checkpoint_dirs(args.model) if args.model else {spec.SHIPPED: FIXTURE_DIR}
    own = {name for name, v in spec.VARIANTS.items() if v.own_checkpoint} if args.model else set()
    if set(args.variant or ()) & own:
        raise OpensciPatchError(f"--variant {', '.join(sorted(set(args.variant) & own))} runs its own checkpoint; "
                                "drop --model")  # fmt: skip
    variants = [m for m in args.variant or spec.VARIANTS if m not in own]
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.torch_sweep:  # its pairs and downloads printed before any download
        from opensci_patch.matrix.torch_sweep import announce

        pairs = announce(versions, log)
    else:
        pairs = {v: list(dict.fromkeys(args.torch or [DEFAULT_TORCH_BUILD])) for v in versions}
    cells = [spec.Cell(v, torch, m, dtype, attn, checkpoint) for checkpoint in dirs
             for torch in dict.fromkeys(t for ts in pairs.values() for t in ts) for v in versions if torch in pairs[v]
             for dtype in args.dtype or ["float32"] for attn in args.attn or ["eager"] for m in variants]  # fmt: skip
    broken = main_cells(cells, dirs, args.records, log=log, jobs=args.jobs, reference=args.reference)
    if broken:
        _err(f"{broken} of {len(cells)} cell(s) could not run (env-error, crash or hotfix-error): see {args.records}")
        return 1
    return 0


def parse_torch(value: str) -> str:
    """`--torch SPEC`: a torch build or a torch release with its flavour (`matrix.spec.torch_spec`)."""
    from opensci_patch.matrix.spec import torch_spec

    try:
        return torch_spec(value)
    except OpensciPatchError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_jobs(value: str) -> int:
    """`--jobs N` (N >= 1) or `auto` (the CPU count): how many releases run at once."""
    if value == "auto":
        return os.cpu_count() or 1
    try:
        jobs = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of jobs; pass N >= 1 or auto") from None
    if jobs < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: pass N >= 1 or auto")
    return jobs


def cmd_report(args) -> int:
    from opensci_patch.results.report import write_report

    bad = write_report(args.records, args.results, machine=args.machine, reference_release=args.reference_release)
    if bad:
        where = args.results / "matrix.md"
        _err(f"{bad} cell(s) FAIL, XPASS, error or cannot-judge, or record file(s) refused: see {where}")
        return 1
    return 0


def cmd_bisect(args) -> int:
    from opensci_patch.results.bisect import bisect

    source = args.model or FIXTURE_DIR
    if args.model:
        from opensci_patch.measure.input_checks import validate_model_dir

        validate_model_dir(args.model)
    versions = [v for arg in args.versions for v in arg.split(",")] if args.versions else None
    if versions is not None:  # each must exist, before any cell runs (without --versions, bisect checks on PyPI)
        from opensci_patch.matrix import releases, spec
        from opensci_patch.results.bisect import release

        named = [str(release(v, flag)) for v, flag in ((args.good, "--good"), (args.bad, "--bad"))]
        releases.check_known([*named, *(str(release(v, "--versions")) for v in versions)], spec.TRANSFORMERS_VERSIONS)
    work = args.work or Path(tempfile.mkdtemp(prefix="opensci-bisect-"))
    say = lambda m: print(m, flush=True)  # noqa: E731
    last_good, first_bad, _ = bisect(  # logs the boundary itself
        args.good, args.bad, torch_build=args.torch, variant=args.variant, model_dir=source, versions=versions,
        work=work, log=say,
    )  # fmt: skip
    if args.no_diagnose:
        return 0
    from opensci_patch import diagnose
    from opensci_patch.matrix.spec import Cell

    diagnose.diagnose(Cell(last_good, args.torch, args.variant), Cell(first_bad, args.torch, args.variant), source,
                      work / "diagnose", log=say)  # fmt: skip
    return 0


def cmd_bigckpt(args) -> int:
    from opensci_patch.fixtures.bigckpt import run_args

    run_args(args)
    return 0


def cmd_diagnose(args) -> int:
    from opensci_patch.diagnose import cmd_diagnose

    return cmd_diagnose(args)


# --- each subcommand's arguments, in the order --help shows them ---------------------------------------------


def _fixture_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path)
    p.add_argument("--force", action="store_true", help="overwrite the fixture files in an existing non-empty dir")
    p.add_argument("--generated", action="store_true", help="the same weights under a modular-generated model file, "
        "as the real checkpoints ship (built from the 4.54.0 Qwen3 code; fetches that wheel once)")  # fmt: skip


def _hotfix_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path)
    p.add_argument("--out", type=Path, default=None, help="output dir (default: SRC_fixed)")
    p.add_argument("--check", action="store_true", help="print the diff of what would change; write nothing")
    p.add_argument("--force", action="store_true", help="replace an existing output dir")
    p.add_argument("--with", dest="extra", action="append", default=[], metavar="PATCH",
        help="also apply an opt-in patch (e.g. init_weights, for transformers 5.0/5.1)")  # fmt: skip
    p.add_argument("--only", action="append", default=None, metavar="PATCH",
        help="apply exactly these patches (experiments, e.g. the structural fixes alone)")  # fmt: skip


def _capture_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path)
    p.add_argument("--out", type=Path, default=None, help="write the JSON record here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default=DTYPES[0], choices=DTYPES)
    p.add_argument("--attn", default=ATTENTION[0], choices=ATTENTION)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--target", default=DEFAULT_TARGET, help="token whose logit is recorded (must be one token)")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    p.add_argument("--shim", action="store_true",
        help="back-fill transformers.utils.TransformersKwargs on releases that lack it (<= 4.53)")  # fmt: skip
    p.add_argument("--reference", choices=["auto", "on", "off"], default="auto",
        help="compare with the fp64 reference forward (auto: only for checkpoints under 1 GiB)")  # fmt: skip
    p.add_argument("--quiet", action="store_true")


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=Path, default=None,
        help="where to put the model dirs and records (default: a new temp dir)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="run again in an earlier demo's workdir, replacing its files")


def _releases_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sweep", action="store_true", help="add the latest patch release of every minor from 4.48 (package index)"
    )
    p.add_argument("--pre", action="store_true", help="add the newest pre-release if it is newer than the newest final")
    p.add_argument("--newest", action="store_true", help="print only the newest final release on the package index")


def _cell_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transformers", action="append", default=[], metavar="VERSION")
    p.add_argument("--all", action="store_true", help="every pinned release (opensci_patch/matrix/spec.py)")
    p.add_argument("--sweep", action="store_true",
        help="the pinned releases plus the latest patch of every minor from 4.48 on the package index")  # fmt: skip
    p.add_argument("--pre", action="store_true", help="also the newest pre-release, if newer than the newest final")
    p.add_argument("--torch", action="append", type=parse_torch, metavar="SPEC",
        help=f"torch, repeatable: a build ({', '.join(TORCH_BUILDS)}; default {DEFAULT_TORCH_BUILD}) or a release with "
        "its flavour (2.13.0+cpu; 2.6.0 = the registry's default wheel, on Linux a CUDA build of ~2.9 GB)")  # fmt: skip
    p.add_argument("--torch-sweep", action="store_true", help="each release (default: the reference and the "
        "newest pinned) on the oldest torch it supports, the pinned one and the index's newest; prints the "
        "downloads first")  # fmt: skip
    p.add_argument("--variant", action="append", choices=list(VARIANTS),
        help="model variants to run (default: all; with --model, all but generated)")  # fmt: skip
    p.add_argument("--dtype", action="append", choices=DTYPES, help="dtypes to run (repeatable; default float32)")
    p.add_argument("--attn", action="append", choices=ATTENTION,
        help="attention implementations to run (repeatable; default eager)")  # fmt: skip
    p.add_argument("--model", type=Path, action="append", metavar="DIR",
        help="checkpoint dir, repeatable: each its own columns (default: the shipped fixture)")  # fmt: skip
    p.add_argument("--records", type=Path, default=Path("records"))
    p.add_argument("--overrides", type=Path, default=None, metavar="FILE",
        help="dependency overrides per release range, for pins the index cannot meet (e.g. "
        "matrix-overrides.txt; default: $OPENSCI_PATCH_OVERRIDES)")  # fmt: skip
    p.add_argument("--require", action="append", default=[], metavar="PKG",
        help="add a requirement to every release env (repeatable; e.g. einops for a model file)")  # fmt: skip
    p.add_argument("--reference", choices=["auto", "on", "off"], default="auto",
        help="each capture's fp64 reference forward (as capture's; auto: checkpoints under 1 GiB)")  # fmt: skip
    p.add_argument("--jobs", type=parse_jobs, default=1, metavar="N|auto",
        help="releases run at once (default 1; auto: one per CPU)")  # fmt: skip


def _diagnose_arguments(p: argparse.ArgumentParser) -> None:
    from opensci_patch.diagnose import add_cli_arguments  # stdlib-only import

    add_cli_arguments(p)


def _bisect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--good", required=True, metavar="VERSION", help="a release known to be good")
    p.add_argument("--bad", required=True, metavar="VERSION", help="a later release known to be bad")
    p.add_argument("--variant", default="structural", choices=[m for m, v in VARIANTS.items() if not v.own_checkpoint],
        help="model variant to judge (default: structural, the naive three-fix model)")  # fmt: skip
    p.add_argument("--torch", default=DEFAULT_TORCH_BUILD, choices=TORCH_BUILDS)
    p.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: the shipped fixture)")
    p.add_argument("--versions", action="append", default=[], metavar="V1,V2,...",
        help="candidate releases (default: every final release on PyPI in the range)")  # fmt: skip
    p.add_argument("--work", type=Path, default=None, help="where records and the diagnose report go")
    p.add_argument("--no-diagnose", action="store_true", help="skip the diagnose report at the boundary")


def _bigckpt_arguments(p: argparse.ArgumentParser) -> None:
    from opensci_patch.fixtures import bigckpt  # torch is imported lazily there

    bigckpt.add_arguments(p)


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--records", type=Path, default=Path("records"))
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--machine", default=None, help="machine description for the report header")
    p.add_argument("--reference-release", metavar="VERSION", help="the release every cell is compared with "
        "(default: per checkpoint, the oldest where its reference variant runs)")  # fmt: skip


# (name, --help line, its arguments, what runs it), in the order --help lists them
SUBCOMMANDS = (
    ("fixture", "write a copy of the shipped open-sci test checkpoint", _fixture_arguments, cmd_fixture),
    ("hotfix", "copy a model dir and apply the compatibility patches", _hotfix_arguments, cmd_hotfix),
    ("capture", "load a model, record the target logit, top-k and greedy generation", _capture_arguments, cmd_capture),
    ("demo", "the main job on the shipped checkpoint: hotfix it, capture original and patched", _demo_arguments,
     cmd_demo),
    ("releases", "print the transformers releases the matrix runs, one per line", _releases_arguments, cmd_releases),
    ("cell", "run cross-version matrix cells, one record per cell", _cell_arguments, cmd_cell),
    ("diagnose", "name the first diverging stage between two cells and the likely cause", _diagnose_arguments,
     cmd_diagnose),
    ("bisect", "find the first transformers release whose logits leave the fp64 reference", _bisect_arguments,
     cmd_bisect),
    ("bigckpt", "write a 1.7B-shaped open-sci checkpoint (random bf16 weights, sharded)", _bigckpt_arguments,
     cmd_bigckpt),
    ("report", "aggregate cell records into markdown tables and a plot", _report_arguments, cmd_report),
)  # fmt: skip


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Given the `argv` it will parse, only the chosen subcommand gets its arguments (diagnose's import its package:
    0.1 s of every hotfix); all keep their --help lines. No recognisable subcommand: every one, as before."""
    chosen = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    every = chosen not in {name for name, *_ in SUBCOMMANDS}
    ap = argparse.ArgumentParser(prog="opensci-patch", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"opensci-patch {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, help_line, add_arguments, run in SUBCOMMANDS:
        p = sub.add_parser(name, help=help_line)
        if every or name == chosen:
            add_arguments(p)
        p.set_defaults(func=run)
    return ap


def _on_sigterm(signum, frame) -> None:
    from opensci_patch._util import procs  # the workers (matrix, diagnose) and installers it started

    procs.terminate_children()
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except (OpensciPatchError, KeyboardInterrupt) as exc:
        rc, line = exit_status(exc)
        print(line, file=sys.stderr)
        return rc
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
