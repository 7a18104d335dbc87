"""Per-cell overhead above the floor, per transformers release (median of N runs).

    python benchmarks/cell_overhead.py                         # 4.48.0, 5.2.0, 5.23.0; cpu torch; 3 runs
    python benchmarks/cell_overhead.py --transformers 4.57.6 --repeat 5 --torch system

All in the per-release env of opensci_patch.matrix.envs (made first if missing, then warm), on the hotfixed
shipped fixture (or --model), float32, eager, CPU; every figure is the wall time of one child
process, measured from the parent (interpreter start-up included):

- floor: the least any cell must do: one `python -c` script that imports torch and transformers,
  loads the model with AutoModelForCausalLM.from_pretrained(trust_remote_code=True) and runs one
  forward on the 5-token prompt. It gets a fresh HF_MODULES_CACHE and HF_HUB_OFFLINE=1, as capture.
- capture: `python -m opensci_patch.cli capture MODEL_fixed --out r.json --quiet` with the matrix
  settings: tokenizer, load, forward, fp64 reference forward (auto: on for checkpoints < 1 GiB),
  greedy generation of 20 tokens, the record (environment probes, sha256 of the modeling files).
- cell: `python -m opensci_patch.cli cell --transformers X --variant patched`: what the matrix
  runs per cell: the driver, the warm env lookup, the hotfix of the original checkpoint (a child of
  the env's python) and the capture (another child).
- hotfix child: `python -m opensci_patch.cli hotfix MODEL --out DIR` alone in the env's python.

A first, uncounted round warms the page cache. overhead = figure - floor, also printed as
figure / floor. The capture's own in-process timings (load, forward, generate; medians) show
where its time goes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _measure import REPO, child_env, load_note, median, run

from opensci_patch._util import locations
from opensci_patch.matrix import envs

FIXTURE = REPO / "opensci_patch" / "data" / "opensci-tiny"
DEFAULT_RELEASES = ["4.48.0", "5.2.0", "5.23.0"]
PROMPT = "The capital of France is"

FLOOR = """\
import sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
model = sys.argv[1]
kw = "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"
tok = AutoTokenizer.from_pretrained(model, trust_remote_code=True)
ids = tok(sys.argv[2], return_tensors="pt", add_special_tokens=False)["input_ids"]
lm = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=True, attn_implementation="eager",
                                          **{kw: torch.float32}).eval()
with torch.no_grad():
    print(float(lm(input_ids=ids).logits[0, -1].max()))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[2:4]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--transformers",
        action="append",
        default=None,
        metavar="VERSION",
        help=f"release (repeatable; default {' '.join(DEFAULT_RELEASES)})",
    )
    ap.add_argument("--torch", default="cpu", choices=["cpu", "system"], help="torch build of the envs (default cpu)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is printed (default 3)")
    ap.add_argument("--model", type=Path, default=None, help="original checkpoint dir (default: the shipped fixture)")
    ap.add_argument(
        "--env-root", type=Path, default=None, help=f"env root (default: ${locations.ROOT_VAR} or the cache)"
    )
    args = ap.parse_args(argv)
    releases = args.transformers or DEFAULT_RELEASES
    source = args.model or FIXTURE
    root = args.env_root or locations.default_root()

    print(
        f"# cell_overhead: torch build {args.torch}, env root {root}, model {source.name}, "
        f"median of {args.repeat}, python {sys.version.split()[0]}, {load_note()}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="opensci-bench-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        fixed = tmp / f"{source.name}_fixed"
        run(
            [sys.executable, "-m", "opensci_patch.cli", "hotfix", str(source), "--out", str(fixed)], env=child_env()
        ).check()
        for version in releases:
            env = envs.ensure_env(version, args.torch, root=root, log=lambda m: print(f"    {m}", flush=True))
            base = child_env({locations.ROOT_VAR: str(root), "TRANSFORMERS_VERBOSITY": "error"})
            floor, capture, cell, inner, hot = [], [], [], [], []
            for i in range(-1, args.repeat):  # run -1: warm-up (page cache, first-import effects), not counted
                modules = tmp / f"hf-modules-{version}-{i}"
                r = run(
                    [str(env.python), "-c", FLOOR, str(fixed), PROMPT],
                    env=base | {"HF_MODULES_CACHE": str(modules), "HF_HUB_OFFLINE": "1"},
                ).check()
                floor.append(r.wall_s)
                rec = tmp / f"rec-{version}-{i}.json"
                r = run(
                    [
                        str(env.python),
                        "-m",
                        "opensci_patch.cli",
                        "capture",
                        str(fixed),
                        "--out",
                        str(rec),
                        "--quiet",
                        "--device",
                        "cpu",
                        "--dtype",
                        "float32",
                        "--attn",
                        "eager",
                    ],
                    env=base,
                ).check()
                capture.append(r.wall_s)
                inner.append(json.loads(rec.read_text())["timings"])
                cmd = [
                    sys.executable,
                    "-m",
                    "opensci_patch.cli",
                    "cell",
                    "--transformers",
                    version,
                    "--torch",
                    args.torch,
                    "--variant",
                    "patched",
                    "--records",
                    str(tmp / f"records-{i}"),
                ]
                if args.model:
                    cmd += ["--model", str(args.model)]
                cell.append(run(cmd, env=base).check().wall_s)
                out = tmp / f"hot-{version}-{i}"
                hot.append(
                    run(
                        [str(env.python), "-m", "opensci_patch.cli", "hotfix", str(source), "--out", str(out)], env=base
                    )
                    .check()
                    .wall_s
                )
                if i < 0:
                    floor, capture, cell, inner, hot = [], [], [], [], []
            f, c, k = median(floor), median(capture), median(cell)
            timing = {key: median([t[key] for t in inner]) for key in ("load_s", "forward_s", "generate_s")}
            h = median(hot)
            rows.append((version, f, c, k, h))
            print(
                f"tf {version}: floor {f:.2f} s | capture {c:.2f} s ({c - f:+.2f} s, {c / f:.2f}x) | "
                f"cell {k:.2f} s ({k - f:+.2f} s, {k / f:.2f}x) | hotfix child alone {h:.2f} s | capture "
                f"in-process: load {timing['load_s']:.2f} s, forward {timing['forward_s']:.2f} s, "
                f"generate {timing['generate_s']:.2f} s",
                flush=True,
            )
    print()
    print(
        "| transformers | floor s | capture s | capture - floor | capture / floor | cell s | cell - floor | "
        "cell / floor | hotfix child s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for version, f, c, k, h in rows:
        print(
            f"| {version} | {f:.2f} | {c:.2f} | {c - f:+.2f} | {c / f:.2f}x | {k:.2f} | {k - f:+.2f} "
            f"| {k / f:.2f}x | {h:.2f} |"
        )
    print(
        "floor = interpreter start + import torch, transformers + tokenizer + from_pretrained + one forward "
        "(one process); capture = opensci-patch capture (adds fp64 reference, 20-token generation, record); "
        "cell = opensci-patch cell (adds driver, env lookup, hotfix child)"
    )
    print(f"at the end: {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
