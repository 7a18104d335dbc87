"""Whole-matrix wall time, cold and warm: opensci-patch's per-release envs against plain `uv run --with`.

    python benchmarks/matrix_wall.py                                   # 4.48.0, 5.2.0, 5.23.0 x patched, cpu torch
    python benchmarks/matrix_wall.py --transformers 4.57.6 --variant original --variant patched
    python benchmarks/matrix_wall.py --bytecode default                # plain runs without --compile-bytecode only

The same cells (release x model variant, float32, eager, CPU) run two ways, in one invocation:

- ours: `python -m opensci_patch.cli cell --transformers X ... --variant V ... --torch B --jobs J`: one
  env per release from opensci_patch.matrix.envs (uv venv + transformers + opensci_patch's requirements,
  bytecode compiled at install, linking one shared torch layer installed once), reused by every variant
  and by later runs; each variant is hotfixed once per run (kept across runs), and one capture process
  per release captures every variant; `--jobs` releases at a time (default auto).
- plain: per cell, `uv run --no-project --isolated --python <this python> --with transformers==X
  --with torch==<pin>+cpu --find-links <PIP_FIND_LINKS> --with <opensci_patch's requirements>
  python -m opensci_patch.cli hotfix ...`, then the same `uv run ... capture ...` (the usual
  "a fresh env per test" approach; uv caches the ephemeral env, so the second call reuses it).
  Measured as uv does it by default (no bytecode compilation) and with `--compile-bytecode`.

cold: a fresh, empty UV_CACHE_DIR for each approach (and a fresh env root for ours): uv downloads
transformers and its dependencies from the index again and unpacks the torch wheel (~190 MB, from
the find-links directory) again. warm: the same cache (and env root) a second time: ours installs
nothing; plain re-resolves and reuses uv's cached ephemeral envs. Both inherit this process's
PYTHONDONTWRITEBYTECODE, printed in the header: with it set, packages without compiled bytecode
are compiled in memory at every import. Every figure is the wall time of the whole matrix, driver
included. The records of both approaches are compared (sha256 of the logits), so both did the same
work. torch build `system` (ours: the running interpreter's torch, linked in) is compared with a
non-isolated plain `uv run` that sees the running interpreter's packages, torch included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _measure import REPO, child_env, load_note, pip_find_links, run

from opensci_patch._util import locations, procs
from opensci_patch.matrix import envs, spec, torch_links

FIXTURE = REPO / "opensci_patch" / "data" / "opensci-tiny"
DEFAULT_RELEASES = ["4.48.0", "5.2.0", "5.23.0"]


def _uv() -> str:
    found = procs.find_uv()
    if not found:
        raise SystemExit("uv not found: pip install 'uv>=0.5'")
    return found


def _ours(args, root: Path, cache: Path, records: Path) -> float:
    cmd = [sys.executable, "-m", "opensci_patch.cli", "cell", "--torch", args.torch, "--records", str(records)]
    cmd += ["--jobs", args.jobs]
    for v in args.transformers:
        cmd += ["--transformers", v]
    for m in args.variant:
        cmd += ["--variant", m]
    if args.model:
        cmd += ["--model", str(args.model)]
    env = child_env({locations.ROOT_VAR: str(root), "UV_CACHE_DIR": str(cache)})
    r = run(cmd, env=env).check()
    if args.verbose:
        print(r.stdout)
    return r.wall_s


def _plain_prefix(args, version: str, compile_bytecode: bool) -> list[str]:
    cmd = [_uv(), "run", "--no-project", "--python", sys.executable, "--with", f"transformers=={version}"]
    if args.torch == "cpu":
        cmd += ["--isolated", "--with", f"torch=={envs.TORCH_PIN}+cpu", *pip_find_links()]
        if index := os.environ.get(torch_links.TORCH_INDEX_VAR):
            cmd += ["--index", index]
    for req in envs.package_requirements():
        cmd += ["--with", req]
    if compile_bytecode:
        cmd.append("--compile-bytecode")
    return [*cmd, "python", "-m", "opensci_patch.cli"]


def cell_cli_args(cell: spec.Cell, model_dir: Path, workdir: Path, record: Path) -> tuple[list[str] | None, list[str]]:
    """A cell as plain `opensci-patch` commands: (hotfix, or None for the original code; capture).

    Here and in sweep_wall.py these run one process per cell, timed against the runner (which runs `worker` steps
    built from the same `Variant.hotfix` options).
    """
    model, hotfix = model_dir, None
    extras = spec.VARIANTS[cell.model].hotfix
    if extras is not None:
        model = workdir / (model_dir.name + "_fixed")
        hotfix = ["hotfix", str(model_dir), "--out", str(model), *extras]
    capture = ["capture", str(model), "--out", str(record), "--quiet",
               "--device", cell.device, "--dtype", cell.dtype, "--attn", cell.attn]  # fmt: skip
    return hotfix, capture


def _plain(args, cache: Path, records: Path, compile_bytecode: bool) -> float:
    env = child_env({"UV_CACHE_DIR": str(cache), "UV_PYTHON_DOWNLOADS": "never"})
    env.pop("VIRTUAL_ENV", None)
    model_dir = args.model or FIXTURE
    records.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for cell in _cells(args):
        prefix = _plain_prefix(args, cell.transformers, compile_bytecode)
        with tempfile.TemporaryDirectory(prefix="plain-cell-") as tmp:
            hotfix, capture = cell_cli_args(cell, model_dir, Path(tmp), records / f"{cell.id}.json")
            if hotfix is not None:
                run([*prefix, *hotfix], env=env).check()
            r = run([*prefix, *capture], env=env)
            if r.returncode not in (0, 1):  # 1: the model code failed, recorded (e.g. the original code)
                r.check()
            if args.verbose:
                print(r.stdout.strip())
    return time.perf_counter() - start


def _cells(args) -> list[spec.Cell]:
    return [spec.Cell(v, args.torch, m) for v in args.transformers for m in args.variant]


def _agree(args, a: Path, b: Path) -> str:
    """Same status everywhere; same logits sha256 where the cell is expected to pass.

    Expected failures may be non-deterministic by nature (uninitialised inv_freq, wiped weights),
    so only their status is compared.
    """
    bad = []
    for cell in _cells(args):
        ra, rb = (json.loads((d / f"{cell.id}.json").read_text()) for d in (a, b))
        keys = ("status", "logits_sha256") if spec.expectation(cell).outcome == "pass" else ("status",)
        if any(ra.get(k) != rb.get(k) for k in keys):
            bad.append(cell.id)
    if bad:
        return f"NO: {', '.join(bad)}"
    return "yes (same status in every cell; same logits sha256 in every cell expected to pass)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[2:5]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--transformers",
        action="append",
        default=None,
        metavar="VERSION",
        help=f"release to include (repeatable; default {' '.join(DEFAULT_RELEASES)})",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=None,
        choices=[m for m, v in spec.VARIANTS.items() if not v.own_checkpoint],  # both approaches run the shipped dir
        help="model variant (repeatable; default patched)",
    )
    ap.add_argument(
        "--torch",
        default="cpu",
        choices=["cpu", "system"],
        help="torch build: cpu = the pinned CPU wheel in every env (default, as the matrix); "
        "system = the running interpreter's torch",
    )
    ap.add_argument(
        "--bytecode",
        default="both",
        choices=["both", "default", "compile"],
        help="plain uv run: as uv does by default, with --compile-bytecode, or both (default)",
    )
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped fixture)")
    ap.add_argument("--workdir", type=Path, default=None, help="for env roots, uv caches, records (default: temp)")
    ap.add_argument(
        "--jobs", default="auto", help="ours: releases in parallel (`cell --jobs`; default auto = one per CPU)"
    )
    ap.add_argument("--verbose", action="store_true", help="print the cells' own output")
    args = ap.parse_args(argv)
    args.transformers = args.transformers or DEFAULT_RELEASES
    args.variant = args.variant or ["patched"]
    for v in args.transformers:
        envs.check_version(v)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="opensci-bench-matrix-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise SystemExit(f"{work} is not empty: cold runs need fresh caches; give an empty or new --workdir")
    plains = {"default": [False], "compile": [True], "both": [False, True]}[args.bytecode]
    cells = _cells(args)
    print(
        f"# matrix_wall: {len(cells)} cells ({', '.join(args.transformers)} x {', '.join(args.variant)}), "
        f"torch build {args.torch}, python {sys.version.split()[0]}, uv {_uv_version()}, "
        f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '(unset)')}, {load_note()}",
        flush=True,
    )
    results: dict[str, dict[str, float]] = {}
    try:
        ours_root, ours_cache = work / "ours-envs", work / "uv-cache-ours"
        names = {False: "plain uv run --with", True: "plain uv run --with --compile-bytecode"}
        for phase in ("cold", "warm"):
            t = _ours(args, ours_root, ours_cache, work / f"records-ours-{phase}")
            results.setdefault("ours: opensci-patch cell (per-release envs)", {})[phase] = t
            print(f"ours {phase}: {t:.1f} s", flush=True)
            for compile_bytecode in plains:
                cache = work / f"uv-cache-plain{'-compile' if compile_bytecode else ''}"
                t = _plain(
                    args,
                    cache,
                    work / f"records-plain{'-compile' if compile_bytecode else ''}-{phase}",
                    compile_bytecode,
                )
                results.setdefault(names[compile_bytecode], {})[phase] = t
                print(f"{names[compile_bytecode]} {phase}: {t:.1f} s", flush=True)
        print()
        print(f"| approach ({len(cells)} cells) | cold s | warm s |")
        print("|---|---:|---:|")
        for name, r in results.items():
            print(f"| {name} | {r['cold']:.1f} | {r['warm']:.1f} |")
        ours = results["ours: opensci-patch cell (per-release envs)"]
        for compile_bytecode in plains:
            plain = results[names[compile_bytecode]]
            print(
                f"ours / {names[compile_bytecode]}: cold {ours['cold'] / plain['cold']:.2f}x, "
                f"warm {ours['warm'] / plain['warm']:.2f}x"
            )
        for compile_bytecode in plains:
            suffix = "-compile" if compile_bytecode else ""
            print(
                f"records agree, ours vs {names[compile_bytecode]} (warm): "
                f"{_agree(args, work / 'records-ours-warm', work / f'records-plain{suffix}-warm')}"
            )
        print(
            "cold = empty UV_CACHE_DIR (and env root): index downloads + torch wheel unpack + env builds + cells; "
            "warm = the same again with the caches filled"
        )
        print(f"at the end: {load_note()}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _uv_version() -> str:
    r = run([_uv(), "--version"])
    return r.stdout.split()[1] if r.returncode == 0 and len(r.stdout.split()) > 1 else "?"


if __name__ == "__main__":
    sys.exit(main())
