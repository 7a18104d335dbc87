"""Release-sweep wall time, cold and warm: `opensci-patch cell` against plain `uv run --with` per cell, as ratios.

    python benchmarks/sweep_wall.py                                   # 4.48.0, 5.2.0, 5.24.0 x all 5 variants
    python benchmarks/sweep_wall.py --transformers 4.57.6 --transformers 5.3.0 --jobs 1
    python benchmarks/sweep_wall.py --variant patched --variant original --plain-bytecode compile

The same cells (release x model variant, float32, eager, CPU) run two ways in one invocation:

- ours: `python -m opensci_patch.cli cell --transformers X ... --jobs J`: one env per release, each
  variant hotfixed once per run, one capture process per release capturing every variant in turn.
- plain: per cell, `uv run --no-project --isolated --with transformers==X --with torch==<pin>+cpu ...
  python -m opensci_patch.cli hotfix ...` then the same `uv run ... capture ...` (matrix_wall.py's
  commands: one fresh process per step, uv's cached ephemeral env per release).

cold: a fresh, empty UV_CACHE_DIR for each approach and a fresh env root for ours. warm: the same
again. Printed, all measured in this run:

- warm sweep / floor sum: ours' warm wall time over the sum, over releases, of one floor (one process:
  import torch + transformers, load the hotfixed model, one forward; cell_overhead.py's FLOOR) run in
  that release's env right after the warm sweep (target <= 1.3);
- cold ours / cold plain (target <= 0.5), and warm ours / warm plain;
- peak memory: the highest sum of RSS over the sweep driver and all its descendants (polled from
  /proc), over the peak RSS of one `capture` process of the same model (target <= 2);
- records: ours (warm, batch) against plain (warm, one process per cell): the same status in every
  cell and, in every cell expected to pass, the same `logits_sha256`, `generation.step_logits_sha256`
  and `generation.ids`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _measure import REPO, child_env, load_note, median, run
from cell_overhead import FLOOR, PROMPT
from matrix_wall import _plain_prefix, _uv, _uv_version, cell_cli_args

from opensci_patch._util import locations
from opensci_patch.matrix import envs, spec

FIXTURE = REPO / "opensci_patch" / "data" / "opensci-tiny"
DEFAULT_RELEASES = ["4.48.0", "5.2.0", "5.24.0"]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return sum(int(line.split()[1]) * 1024 for line in fh if line.startswith(("RssAnon:", "RssFile:")))
    except (OSError, ValueError):
        return 0


def tree_run(
    cmd: list[str], env: dict[str, str], poll_s: float = 0.1, cwd: Path | None = None
) -> tuple[float, int, str]:
    """(wall s, peak of the summed RSS of the process and all its descendants, output); fails loudly."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    peak = [0]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            kids, total, todo = _children(), 0, [proc.pid]
            while todo:
                pid = todo.pop()
                total += _rss(pid)
                todo += kids.get(pid, [])
            peak[0] = max(peak[0], total)
            done.wait(poll_s)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    poller.join()
    if proc.returncode != 0:
        raise SystemExit(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return wall, peak[0], out


def _cells(args) -> list[spec.Cell]:
    return [spec.Cell(v, args.torch, m) for v in args.transformers for m in args.variant]


def _ours(args, root: Path, cache: Path | None, records: Path, extra: tuple[str, ...] = (),
          tree: Path | None = None) -> tuple[float, int]:  # fmt: skip
    """`opensci-patch cell` over the sweep's cells: this checkout's, or the one at `tree` (`--baseline`)."""
    cmd = [sys.executable, "-m", "opensci_patch.cli", "cell", "--torch", args.torch, "--records", str(records), *extra]
    cmd += [a for v in args.transformers for a in ("--transformers", v)]
    cmd += [a for m in args.variant for a in ("--variant", m)]
    cmd += ["--jobs", str(args.jobs)]
    cache_var = {"UV_CACHE_DIR": str(cache)} if cache else {}
    env = child_env({locations.ROOT_VAR: str(root), **cache_var})
    if tree is not None:  # and run from there: `python -m` puts the working directory first on sys.path
        env["PYTHONPATH"] = str(tree)
    wall, peak, out = tree_run(cmd, env, cwd=tree)
    if args.verbose:
        print(out)
    return wall, peak


def _baseline_tree(rev: str, where: Path) -> Path:
    """A detached git worktree of `rev` (`--baseline`), for its own 1-panel sweep."""
    tree = where / f"baseline-{rev}"
    run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev]).check()
    return tree


def _variants_of(tree: Path) -> list[str]:
    code = "from opensci_patch.matrix import spec; print(' '.join(spec.VARIANTS))"
    out = subprocess.run([sys.executable, "-c", code], env={**child_env(), "PYTHONPATH": str(tree)}, cwd=tree,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.split()


def _panels(args) -> int:
    """`--panels`: the warm sweep of the matrix's panels (float32/bfloat16 x eager/sdpa) against one panel (float32
    eager), the same releases and variants in the same env root, alternated `--repeat` times after one uncounted
    warm-up of each; prints the medians and their ratio (target <= 1.3: the panels share each release's process).
    `--baseline REV` adds REV's own 1-panel sweep (a git worktree of REV, its own env root) to the alternation, on
    the variants both have: the 4 panels now against the 1 panel as it was then."""
    root = (args.env_root or locations.default_root()).expanduser().absolute()
    panels = tuple(spec.panel_args())
    n = len(spec.MATRIX_DTYPES) * len(spec.MATRIX_ATTENTION)
    runs: dict[str, tuple[tuple[str, ...], Path | None, Path]] = {"1 panel": ((), None, root),
                                                                  f"{n} panels": (panels, None, root)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="opensci-bench-panels-") as tmp:
        base_tree = _baseline_tree(args.baseline, Path(tmp)) if args.baseline else None
        if base_tree is not None:
            args.variant = [v for v in args.variant if v in _variants_of(base_tree)]
            base_root = root.parent / f"{root.name}-baseline-{args.baseline}"
            runs[f"1 panel at {args.baseline}"] = ((), base_tree, base_root)
        walls: dict[str, list[float]] = {name: [] for name in runs}
        try:
            for i in range(args.repeat + 1):
                for name, (extra, tree, env_root) in runs.items():
                    wall, _ = _ours(args, env_root, None, Path(tmp) / f"records-{i}-{len(walls[name])}-{len(extra)}"
                                    f"-{tree is not None}", extra, tree)  # fmt: skip
                    print(f"{name}{' (warm-up, not counted)' if i == 0 else ''}: {wall:.1f} s", flush=True)
                    if i:
                        walls[name].append(wall)
        finally:
            if base_tree is not None:
                run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)])
    got = {name: median(w) for name, w in walls.items()}
    many = got[f"{n} panels"]
    print(f"\n| {len(_cells(args))} cells a panel ({', '.join(args.variant)}), {len(args.transformers)} releases, "
          f"median of {args.repeat} | s |\n|---|---:|")  # fmt: skip
    for name, wall in got.items():
        print(f"| {name}{f' ({chr(32).join(panels)})' if name == f'{n} panels' else ' (float32 eager)'} | {wall:.1f} |")
    for name, wall in got.items():
        if name != f"{n} panels":
            ratio = many / wall
            print(f"{n} panels / {name}: {ratio:.2f}x (target <= 1.3: {'met' if ratio <= 1.3 else 'NOT met'})")
    print(f"at the end: {load_note()}")
    return 0


def _plain(args, cache: Path, records: Path, root: Path) -> float:
    from opensci_patch.fixtures.own import ensure_checkpoint

    env = child_env({"UV_CACHE_DIR": str(cache), "UV_PYTHON_DOWNLOADS": "never"})
    env.pop("VIRTUAL_ENV", None)
    records.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for cell in _cells(args):
        prefix = _plain_prefix(args, cell.transformers, args.plain_bytecode == "compile")
        variant = spec.VARIANTS[cell.model]
        source = ensure_checkpoint(variant.checkpoint, root, log=lambda m: None) if variant.own_checkpoint else FIXTURE
        with tempfile.TemporaryDirectory(prefix="plain-cell-") as tmp:
            hotfix, capture = cell_cli_args(cell, source, Path(tmp), records / f"{cell.id}.json")
            if hotfix is not None:
                run([*prefix, *hotfix], env=env).check()
            r = run([*prefix, *capture], env=env)
            if r.returncode not in (0, 1):  # 1: the model code failed, recorded (e.g. the original code)
                r.check()
    return time.perf_counter() - start


def _floors(args, root: Path, work: Path) -> tuple[dict[str, float], int]:
    """One floor per release (after an uncounted warm-up run), and the peak RSS of one capture process."""
    fixed = work / "floor-model" / f"{FIXTURE.name}_fixed"
    run(
        [sys.executable, "-m", "opensci_patch.cli", "hotfix", str(FIXTURE), "--out", str(fixed)], env=child_env()
    ).check()
    floors, capture_rss = {}, 0
    for version in args.transformers:
        env = envs.ensure_env(version, args.torch, root=root, log=lambda m: None)
        walls = []
        for i in range(args.floor_repeat + 1):
            modules = work / f"hf-modules-{version}-{i}"
            base = child_env({locations.ROOT_VAR: str(root), "HF_MODULES_CACHE": str(modules), "HF_HUB_OFFLINE": "1"})
            walls.append(run([str(env.python), "-c", FLOOR, str(fixed), PROMPT], env=base).check().wall_s)
        floors[version] = median(walls[1:])
        rec = work / f"capture-{version}.json"
        cap = run(
            [str(env.python), "-m", "opensci_patch.cli", "capture", str(fixed), "--out", str(rec), "--quiet"],
            env=child_env({locations.ROOT_VAR: str(root)}),
        ).check()
        capture_rss = max(capture_rss, cap.peak_rss)
    return floors, capture_rss


def _evidence(rec: dict) -> tuple:
    gen = rec.get("generation") or {}
    return rec.get("logits_sha256"), gen.get("step_logits_sha256"), gen.get("ids")


def _agree(args, ours: Path, plain: Path) -> tuple[bool, str]:
    bad, compared = [], 0
    for cell in _cells(args):
        a, b = (json.loads((d / f"{cell.id}.json").read_text()) for d in (ours, plain))
        same = a["status"] == b["status"]
        if spec.expectation(cell).outcome == "pass":
            same = same and _evidence(a) == _evidence(b) and a["logits_sha256"] is not None
            compared += 1
        if not same:
            bad.append(cell.id)
    if bad:
        return False, f"NO: {', '.join(bad)}"
    return True, (
        f"yes: the same status in all {len(_cells(args))} cells; the same logits_sha256, "
        f"step_logits_sha256 and ids in the {compared} cells expected to pass"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[2:5]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--transformers", action="append", default=None, metavar="VERSION",
                    help=f"release (repeatable; default {' '.join(DEFAULT_RELEASES)})")  # fmt: skip
    ap.add_argument("--variant", action="append", default=None, choices=list(spec.VARIANTS),
                    help="model variant (repeatable; default all)")  # fmt: skip
    ap.add_argument("--jobs", default="auto", help="ours: releases at once (N or auto; default auto)")
    ap.add_argument("--torch", default="cpu", choices=["cpu", "system"], help="torch build (default cpu)")
    ap.add_argument("--plain-bytecode", default="default", choices=["default", "compile"],
                    help="plain uv run: as uv does by default, or with --compile-bytecode")  # fmt: skip
    ap.add_argument("--floor-repeat", type=int, default=1, help="floor runs per release, median (default 1)")
    ap.add_argument("--workdir", type=Path, default=None, help="for env roots, uv caches, records (default: temp)")
    ap.add_argument("--verbose", action="store_true", help="print ours' progress lines")
    ap.add_argument("--panels", action="store_true",
                    help="instead: the warm sweep of the matrix's 4 panels (float32/bfloat16 x eager/sdpa) against "
                         "1 panel, same run, in --env-root (default: the usual env root, reused)")  # fmt: skip
    ap.add_argument("--env-root", type=Path, default=None, help="--panels: the env root (default: the usual one)")
    ap.add_argument("--repeat", type=int, default=1, help="--panels: timed runs of each, median (default 1)")
    ap.add_argument("--baseline", metavar="REV", default=None,
                    help="--panels: also REV's own 1-panel sweep (a git worktree of REV, env root <env-root>-baseline-"
                         "REV), on the variants both have")  # fmt: skip
    args = ap.parse_args(argv)
    args.transformers = args.transformers or DEFAULT_RELEASES
    args.variant = args.variant or list(spec.VARIANTS)
    for v in args.transformers:
        envs.check_version(v)
    if args.panels:
        print(f"# sweep_wall --panels: {', '.join(args.transformers)} x {', '.join(args.variant)}, torch build "
              f"{args.torch}, --jobs {args.jobs}, {load_note()}", flush=True)  # fmt: skip
        return _panels(args)
    _uv()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="opensci-bench-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise SystemExit(f"{work} is not empty: cold runs need fresh caches; give an empty or new --workdir")
    cells = _cells(args)
    print(
        f"# sweep_wall: {len(cells)} cells ({', '.join(args.transformers)} x {', '.join(args.variant)}), "
        f"ours --jobs {args.jobs}, torch build {args.torch}, python {sys.version.split()[0]}, uv {_uv_version()}, "
        f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '(unset)')}, {load_note()}",
        flush=True,
    )
    try:
        root, cache = work / "ours-envs", work / "uv-cache-ours"
        ours, plain, peaks = {}, {}, {}
        for phase in ("cold", "warm"):
            ours[phase], peaks[phase] = _ours(args, root, cache, work / f"records-ours-{phase}")
            print(f"ours {phase}: {ours[phase]:.1f} s, peak RSS of driver + children {peaks[phase] / 1e9:.2f} GB",
                  flush=True)  # fmt: skip
            plain[phase] = _plain(args, work / "uv-cache-plain", work / f"records-plain-{phase}", root)
            print(f"plain uv run per cell {phase}: {plain[phase]:.1f} s", flush=True)
        floors, capture_rss = _floors(args, root, work)
        floor_sum = sum(floors.values())
        print(f"floors: {', '.join(f'{v} {f:.2f} s' for v, f in floors.items())} (sum {floor_sum:.1f} s); "
              f"one capture process: peak RSS {capture_rss / 1e9:.2f} GB", flush=True)  # fmt: skip
        ok, agree = _agree(args, work / "records-ours-warm", work / "records-plain-warm")
        print()
        print(f"| {len(cells)} cells, {len(args.transformers)} releases | cold s | warm s |")
        print("|---|---:|---:|")
        print(f"| ours: opensci-patch cell --jobs {args.jobs} | {ours['cold']:.1f} | {ours['warm']:.1f} |")
        print(f"| plain uv run --with per cell | {plain['cold']:.1f} | {plain['warm']:.1f} |")
        print()
        ratios = [
            ("warm sweep / sum of one floor per release", ours["warm"] / floor_sum, 1.3),
            ("cold ours / cold plain", ours["cold"] / plain["cold"], 0.5),
            ("warm ours / warm plain", ours["warm"] / plain["warm"], None),
            ("peak RSS, driver + children (warm) / one capture process", peaks["warm"] / capture_rss, 2.0),
            ("peak RSS, driver + children (cold) / one capture process", peaks["cold"] / capture_rss, 2.0),
        ]
        for name, value, target in ratios:
            verdict = "" if target is None else f" (target <= {target}: {'met' if value <= target else 'NOT met'})"
            print(f"{name}: {value:.2f}x{verdict}")
        print(f"records identical, ours (warm, one process per release) vs plain (one process per cell): {agree}")
        print(f"at the end: {load_note()}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
