"""CPU capture of a 1.7B-shaped open-sci checkpoint: wall time and peak RSS against the checkpoint size.

    python benchmarks/cpu_capture_1p7b.py                      # generate (3.4 GB), hotfix, capture, print
    python benchmarks/cpu_capture_1p7b.py --model DIR          # reuse a checkpoint (hotfixed unless it is already)
    python benchmarks/cpu_capture_1p7b.py --transformers 4.48.0 --transformers 5.2.0   # per-release envs

Steps, each a child process measured on its own (os.wait4 gives that child's peak RSS; /proc is
polled every 50 ms to split it into anonymous memory and file-backed pages, e.g. mmap'd weights):

1. `python -m opensci_patch.fixtures.bigckpt` writes random bf16 weights with the open-sci-ref-v0.01-1.7b
   shapes (skipped with --model).
2. `opensci-patch hotfix` makes the loadable copy (skipped when DIR already has a hotfix manifest).
3. the import floor: `python -c "import torch, transformers"` in the same interpreter;
4. `opensci-patch capture DIR_fixed --dtype bfloat16 --attn eager --reference off --max-new-tokens 4`
   (--dtype float32 measures the cost of converting the bf16 weights at load)
   in this interpreter (default) or in the env of each --transformers release (opensci_patch.matrix.envs);
5. a staged probe in the same interpreter: RssAnon/RssFile after import, after from_pretrained,
   after one forward, after generate; it says where the memory above the checkpoint size goes.

The figure of merit is peak RSS / checkpoint bytes: ~1x means the weights are held once; ~2x means
a second copy exists at some point (e.g. a float32 or materialised copy next to the mmap'd file).
Needs ~2x the checkpoint size of free disk (original + hotfixed copy) under --workdir.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from _measure import Run, child_env, dir_bytes, gb, interpreters, load_note, make_workdir, run

# Mirrors capture's load path (AutoModelForCausalLM, trust_remote_code, dtype keyword of the release,
# .to(device).eval(), no_grad forward, greedy generate) and reports memory at each stage.
PROBE = r"""
import json, sys, time
def mem():
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("RssAnon", "RssFile", "VmHWM"):
            d[k] = int(v.split()[0]) * 1024
    return d
stages = {"start": mem()}
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from opensci_patch.measure import compat
from opensci_patch.measure.isolation import isolated_hf_cache
stages["import"] = mem()
model, max_new = sys.argv[1], int(sys.argv[2])
with isolated_hf_cache():
    tok = AutoTokenizer.from_pretrained(model, trust_remote_code=True)
    ids = tok("The capital of France is", return_tensors="pt", add_special_tokens=False)["input_ids"]
    t0 = time.perf_counter()
    lm = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=True, attn_implementation="eager",
                                              **{compat.dtype_keyword(): getattr(torch, sys.argv[3])})
    lm.to("cpu").eval()
    load_s = time.perf_counter() - t0
    stages["from_pretrained"] = mem()
    dtypes = sorted({str(p.dtype) for p in lm.parameters()})
    tied = lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    n_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    with torch.no_grad():
        lm(input_ids=ids)
    stages["forward"] = mem()
    with torch.no_grad():
        lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                    pad_token_id=tok.pad_token_id)
    stages["generate"] = mem()
print("PROBE " + json.dumps({"stages": stages, "param_dtypes": dtypes, "tied": tied, "param_bytes": n_bytes,
                             "load_s": load_s, "transformers": transformers.__version__,
                             "torch": torch.__version__}))
"""


def _peak_line(name: str, r: Run, ckpt: int | None = None) -> str:
    line = f"{name}: {r.wall_s:.1f} s, peak RSS {gb(r.peak_rss)}"
    if r.peak_anon or r.peak_file:
        line += f" (polled peaks: anonymous {gb(r.peak_anon)}, file-backed {gb(r.peak_file)})"
    if ckpt:
        line += f" = {r.peak_rss / ckpt:.2f}x the checkpoint"
    return line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[2:5]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", type=Path, help="existing checkpoint dir (original or hotfixed); default: generate one")
    ap.add_argument("--workdir", type=Path, help="where generated/hotfixed dirs go (default: a temp dir, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the generated/hotfixed dirs in --workdir")
    ap.add_argument("--layers", type=int, default=24, help="layers of the generated checkpoint (default 24 = 1.7B)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--transformers",
        action="append",
        default=[],
        metavar="VERSION",
        help="capture in the per-release env of this release (repeatable); default: this interpreter",
    )
    ap.add_argument("--torch", default="system", choices=["system", "cpu"], help="torch build of those envs")
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32", "float16"],
        help="capture dtype (default bfloat16, the checkpoint's; float32 shows the cost of a conversion)",
    )
    ap.add_argument("--no-probe", action="store_true", help="skip the staged memory probe")
    args = ap.parse_args(argv)

    workdir, temporary = make_workdir(args.workdir, "opensci-bench-1p7b-")
    env = child_env({"TRANSFORMERS_VERBOSITY": "error"})
    made: list[Path] = []
    try:
        print(f"# cpu_capture_1p7b: python {sys.version.split()[0]}, workdir {workdir}, {load_note()}", flush=True)
        if args.model:
            source = args.model
        else:
            source = workdir / f"osr-1p7b-l{args.layers}-s{args.seed}"
            r = run(
                [
                    sys.executable,
                    "-m",
                    "opensci_patch.fixtures.bigckpt",
                    str(source),
                    "--layers",
                    str(args.layers),
                    "--seed",
                    str(args.seed),
                ],
                env=env,
            ).check()
            made.append(source)
            print(r.stdout.strip().splitlines()[0])
            print(_peak_line("generate", r))
        ckpt = dir_bytes(source, "*.safetensors")
        cfg = json.loads((source / "config.json").read_text())
        print(
            f"checkpoint: {source} | {gb(ckpt)} of safetensors ({len(list(source.glob('*.safetensors')))} files)"
            f" | {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']}"
        )

        if (source / "opensci_patch_manifest.json").is_file():
            fixed = source
            print("hotfix: skipped (already hotfixed)")
        else:
            fixed = workdir / f"{source.name}_fixed"
            if fixed.exists():
                raise SystemExit(f"{fixed} exists; remove it or pass the hotfixed dir as --model")
            r = run(
                [sys.executable, "-m", "opensci_patch.cli", "hotfix", str(source), "--out", str(fixed)], env=env
            ).check()
            made.append(fixed)
            print(_peak_line("hotfix (copy + patch)", r))

        for label, python in interpreters(args.transformers, args.torch):
            print(f"== capture in {label}", flush=True)
            floor = run([python, "-c", "import torch, transformers"], env=env).check()
            print(_peak_line('import floor: python -c "import torch, transformers"', floor))
            rec = workdir / "record.json"
            rec.unlink(missing_ok=True)
            cmd = [
                python,
                "-m",
                "opensci_patch.cli",
                "capture",
                str(fixed),
                "--dtype",
                args.dtype,
                "--attn",
                "eager",
                "--reference",
                "off",
                "--max-new-tokens",
                str(args.max_new_tokens),
                "--quiet",
                "--out",
                str(rec),
            ]
            r = run(cmd, env=env).check()
            record = json.loads(rec.read_text())
            t = record["timings"]
            print(f"capture: opensci-patch capture {fixed.name} {' '.join(cmd[5:])}")
            print(f"  {r.stdout.strip()[:160]}")
            print(
                f"  wall {r.wall_s:.1f} s (in-process: load {t['load_s']} s, forward {t['forward_s']} s, "
                f"generate {t['generate_s']} s of {args.max_new_tokens} tokens)"
            )
            print(
                f"  peak RSS {gb(r.peak_rss)} (polled peaks: anonymous {gb(r.peak_anon)}, "
                f"file-backed {gb(r.peak_file)}) | checkpoint {gb(ckpt)}"
            )
            print(
                f"  peak RSS / checkpoint bytes = {r.peak_rss / ckpt:.2f}x; "
                f"(peak RSS - import floor) / checkpoint bytes = {(r.peak_rss - floor.peak_rss) / ckpt:.2f}x"
            )
            if not args.no_probe:
                p = run([python, "-c", PROBE, str(fixed), str(args.max_new_tokens), args.dtype], env=env).check()
                line = next(x for x in p.stdout.splitlines() if x.startswith("PROBE "))
                probe = json.loads(line[6:])
                print(
                    f"  staged probe (same load path; params {', '.join(probe['param_dtypes'])}, "
                    f"{gb(probe['param_bytes'])}, head tied to embedding: {probe['tied']}, "
                    f"from_pretrained {probe['load_s']:.2f} s):"
                )
                for stage, m in probe["stages"].items():
                    print(
                        f"    {stage:>16}: anonymous {gb(m['RssAnon'])}, file-backed {gb(m['RssFile'])}, "
                        f"high-water {gb(m['VmHWM'])}"
                    )
        print(f"at the end: {load_note()}")
    finally:
        if temporary and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif made:
            print(f"kept: {', '.join(str(m) for m in made)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
