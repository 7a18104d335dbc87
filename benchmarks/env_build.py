"""A warm per-release env build: today's shared torch layer against uv installing torch like any requirement.

    python benchmarks/env_build.py                          # 4.48.0 and 5.25.0, 3 builds each, median
    python benchmarks/env_build.py --transformers 5.2.0 --repeat 5

Issue 27 asks whether the per-release envs should let uv install torch (uv's cache hardlinks it into each
env) instead of linking today's shared torch layer (`matrix/torch_links.py`). Both sides run warm, in one
private env root and with the machine's uv cache:

- layer: `envs.ensure_env(X, "cpu")` in a private env root whose torch layer and uv cache are already made by
  an uncounted first build; each counted build first removes the release's env (not the layer).
- uv: `uv venv` then `uv pip install torch==<pin>+cpu transformers==X` (pip's find-links passed on, as the envs
  do) into a new directory, after an uncounted first install filled uv's cache; once with `--compile-bytecode`
  (the end state of our envs, whose torch the layer compiled once: with PYTHONDONTWRITEBYTECODE=1, as on this
  project's machines, an uncompiled env recompiles every import in memory, each run) and once without.

Each figure is the wall time of the whole build, measured from here; the ratios are uv / layer (above 1: the
layer is faster). The envs are checked to import the same torch and transformers.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import load_note, median, pip_find_links

from opensci_patch._util import procs
from opensci_patch._util.defaults import TORCH_PIN
from opensci_patch.matrix import envs, venv

DEFAULT_RELEASES = ["4.48.0", "5.25.0"]
CHECK = "import torch, transformers; print(torch.__version__, transformers.__version__)"


def _layer_build(version: str, root: Path) -> tuple[float, str]:
    env_dir = root / envs.env_name(version, "cpu", [])
    shutil.rmtree(env_dir, ignore_errors=True)
    start = time.perf_counter()
    env = envs.ensure_env(version, "cpu", root=root, log=lambda m: None, overrides=[], extra_requirements=[])
    took = time.perf_counter() - start
    return took, subprocess.run([str(env.python), "-c", CHECK], capture_output=True, text=True).stdout.strip()


def _uv_build(version: str, where: Path, uv: str, compile_bytecode: bool) -> tuple[float, str]:
    shutil.rmtree(where, ignore_errors=True)
    python = venv.venv_python(where)
    start = time.perf_counter()
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(where)], check=True)
    install = [uv, "pip", "install", "-q", "--python", str(python), f"torch=={TORCH_PIN}+cpu",
               f"transformers=={version}", *pip_find_links(), *(["--compile-bytecode"] if compile_bytecode else [])]
    subprocess.run(install, check=True)
    took = time.perf_counter() - start
    return took, subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transformers", action="append", default=None, metavar="VERSION",
                    help=f"release (repeatable; default {' '.join(DEFAULT_RELEASES)})")  # fmt: skip
    ap.add_argument("--repeat", type=int, default=3, help="counted builds per side (default 3; median printed)")
    args = ap.parse_args(argv)
    uv = procs.find_uv()
    if uv is None:
        print("uv is not installed: nothing to compare", file=sys.stderr)
        return 2
    print(load_note())
    with tempfile.TemporaryDirectory(prefix="env-build-") as tmp:
        root, plain = Path(tmp) / "envs", Path(tmp) / "plain"
        for version in args.transformers or DEFAULT_RELEASES:
            _layer_build(version, root)  # uncounted: the layer, the env's wheels in uv's cache
            _uv_build(version, plain, uv, False)  # uncounted: torch and transformers in uv's cache
            times: dict[str, list[float]] = {"layer": [], "uv+compile": [], "uv": []}
            seen = set()
            for _ in range(args.repeat):  # alternated, so load drifts hit every side alike
                for side in times:
                    took, versions = (_layer_build(version, root) if side == "layer"
                                      else _uv_build(version, plain, uv, side == "uv+compile"))  # fmt: skip
                    times[side].append(took)
                    seen.add(versions)
            if len(seen) != 1:
                print(f"{version}: the envs differ ({sorted(seen)}); not comparable")
                return 1
            m = {side: median(values) for side, values in times.items()}
            print(f"transformers {version} ({seen.pop()}), median of {args.repeat}: layer {m['layer']:.2f} s, "
                  f"uv+compile {m['uv+compile']:.2f} s ({m['uv+compile'] / m['layer']:.2f}x), "
                  f"uv without compiling {m['uv']:.2f} s ({m['uv'] / m['layer']:.2f}x)")
    print(load_note())
    return 0


if __name__ == "__main__":
    sys.exit(main())
