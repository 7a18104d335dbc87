"""Hotfix wall time per model file, and the test-suite split, this checkout against an older one, in one run.

    python benchmarks/hotfix_wall.py                        # shipped + generated + 1.7B-shaped (2 layers), vs main
    python benchmarks/hotfix_wall.py --old HEAD~3 --repeat 9 --no-bigckpt
    python benchmarks/hotfix_wall.py --suite                # also the tests: fast, crossversion, old whole run

The old tree is `git archive OLD` unpacked in a temporary directory (or OLD itself, a directory); both
trees run the same command (`python -m opensci_patch.cli hotfix SRC --out DST`, this interpreter,
PYTHONPATH = the tree, run in the tree: `python -m` puts the working directory first on sys.path, so from
another checkout both would run that one), old and new interleaved so that other work on the machine
weighs on both alike. Each tree's modules are compiled once, by an untimed first run, into the work
directory (PYTHONPYCACHEPREFIX, whatever PYTHONDONTWRITEBYTECODE says): the timed runs import bytecode,
as an installed package does, instead of compiling the whole tree each time.
Per model directory: the median and the fastest of --repeat runs of each, and new/old. The outputs of
both trees are compared file by file (sha256; the manifest without its `created_utc`), for the default
patches and with `--with init_weights`: "identical" or the files that differ.

Model directories: the shipped checkpoint (`opensci-patch fixture`), the modular-generated one
(`fixture --generated`: needs the transformers 4.54.0 wheel, cached in the env root) and, unless
--no-bigckpt, a 1.7B-shaped one (`python -m opensci_patch.fixtures.bigckpt --layers N`, random bf16 weights:
hidden 2048, vocabulary 50k; the time there is mostly the copy of the weights).

--suite: `pytest -n auto -m "not crossversion"` (what `nox -s tests` runs) and `-m crossversion`
(`nox -s crossversion`) in this checkout, and `pytest -n auto` in the old tree (its default run),
each once, in this interpreter (no nox venv, so no install time); wall time and the pytest summary line.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _measure import REPO, load_note, run

MANIFEST = "opensci_patch_manifest.json"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "opensci_patch.cli", *args]


def _env(tree: Path, bytecode: Path | None = None) -> dict[str, str]:
    """This environment with `tree` (and nothing else) on PYTHONPATH: that tree's opensci_patch runs.

    With `bytecode`, the compiled modules are written and read there (never in the tree)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(tree)
    if bytecode is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(bytecode)
    return env


def _archive(rev: str, into: Path) -> Path:
    proc = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"hotfix_wall: git archive {rev} failed: {proc.stderr.decode().strip()}")
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=proc.stdout, check=True)
    return into


def _digests(out: Path) -> dict[str, str]:
    found = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == MANIFEST:
            data = b"\n".join(line for line in data.splitlines() if b'"created_utc"' not in line)
        found[path.relative_to(out).as_posix()] = hashlib.sha256(data).hexdigest()
    return found


def _hotfix(tree: Path, src: Path, out: Path, extra: list[str]) -> float:
    """One hotfix by `tree` into `out`, its wall time; the tree's bytecode is kept next to `out`."""
    shutil.rmtree(out, ignore_errors=True)
    env = _env(tree, out.parent / f"bytecode-{out.name}")
    return run([*_cli("hotfix", str(src), "--out", str(out)), *extra], env=env, cwd=tree).check().wall_s


def _differences(trees: dict[str, Path], src: Path, work: Path) -> list[str]:
    """The output files whose bytes differ between the trees, default patches and with init_weights."""
    differ = []
    for extra in ([], ["--with", "init_weights"]):
        outs = {}
        for name, tree in trees.items():
            _hotfix(tree, src, work / f"out-{name}", extra)
            outs[name] = _digests(work / f"out-{name}")
        paths = sorted(set(outs["old"]) | set(outs["new"]))
        differ += [f"{p} ({' '.join(extra) or 'default'})" for p in paths if outs["old"].get(p) != outs["new"].get(p)]
    return differ


def _models(work: Path, bigckpt_layers: int) -> list[tuple[str, Path]]:
    models = [("shipped", work / "shipped"), ("generated", work / "generated")]
    run(_cli("fixture", str(models[0][1])), env=_env(REPO), cwd=REPO).check()
    run(_cli("fixture", str(models[1][1]), "--generated"), env=_env(REPO), cwd=REPO).check()
    if bigckpt_layers:
        big = work / "bigckpt"
        cmd = [sys.executable, "-m", "opensci_patch.fixtures.bigckpt", str(big), "--layers", str(bigckpt_layers)]
        run(cmd, env=_env(REPO), cwd=REPO).check()
        models.append((f"1.7B-shaped, {bigckpt_layers} layers", big))
    return models


def _suite(tree: Path, marker: str | None) -> tuple[float, str]:
    """Wall time and pytest's summary line, then the FAILED/ERROR lines (-rfE) under it."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-n", "auto"]
    cmd += ["-m", marker] if marker else []
    r = run(cmd, env=_env(tree), cwd=tree)
    lines = r.stdout.splitlines()
    summary = next((line for line in reversed(lines) if " in " in line), "(no summary)").strip("= ")
    failed = [f"      {line}" for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return r.wall_s, "\n".join([summary, *failed])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--old", default="main", help="the revision (or an unpacked tree) to compare with (default: main)")
    ap.add_argument("--repeat", type=int, default=5, help="hotfix runs per tree and model (default 5)")
    ap.add_argument("--bigckpt-layers", type=int, default=2, help="layers of the 1.7B-shaped checkpoint (default 2)")
    ap.add_argument("--no-bigckpt", action="store_true", help="leave the 1.7B-shaped checkpoint out")
    ap.add_argument("--suite", action="store_true", help="also time the test suite (fast, crossversion, old whole)")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    print(f"hotfix_wall: this checkout vs {args.old}; {load_note()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="hotfix-wall-"))
    try:
        old = Path(args.old).resolve() if Path(args.old).is_dir() else _archive(args.old, work / "old-tree")
        trees = {"old": old, "new": REPO}
        models = _models(work / "models", 0 if args.no_bigckpt else args.bigckpt_layers)
        for name, tree in trees.items():  # untimed: compiles the tree's modules
            _hotfix(tree, models[0][1], work / f"out-{name}", [])
        head = ("model", "old median", "new median", "new/old", "old min", "new min")
        print(f"{head[0]:<26} {head[1]:>10} {head[2]:>10} {head[3]:>8} {head[4]:>8} {head[5]:>8}  outputs")
        for label, src in models:
            times: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(args.repeat):
                for name, tree in trees.items():
                    times[name].append(_hotfix(tree, src, work / f"out-{name}", []))
            differ = _differences(trees, src, work)
            o, n = statistics.median(times["old"]), statistics.median(times["new"])
            same = "identical" if not differ else "DIFFER: " + ", ".join(differ)
            print(f"{label:<26} {o:>9.2f}s {n:>9.2f}s {n / o:>7.2f}x {min(times['old']):>7.2f}s "
                  f"{min(times['new']):>7.2f}s  {same}", flush=True)  # fmt: skip
        if args.suite:
            print("test suite (pytest -n auto in this interpreter, each once):", flush=True)
            fast, fast_line = _suite(REPO, "not crossversion")
            print(f"  new fast (nox -s tests)           {fast:7.0f}s  {fast_line}", flush=True)
            cross, cross_line = _suite(REPO, "crossversion")
            print(f"  new crossversion (-s crossversion) {cross:7.0f}s  {cross_line}", flush=True)
            whole, whole_line = _suite(old, None)
            print(f"  old whole default run             {whole:7.0f}s  {whole_line}", flush=True)
            print(f"  new fast / old whole: {fast / whole:.2f}x; new fast + crossversion / old whole: "
                  f"{(fast + cross) / whole:.2f}x", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"end: {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
