"""Load time, peak device memory and greedy decode tokens/s on the 1.7B-shaped checkpoint, per release.

    python benchmarks/decode_1p7b.py --torch cuda --transformers 4.48.0 --transformers 5.23.0   # on a GPU
    python benchmarks/decode_1p7b.py --device cpu --layers 2 --new-tokens 16                  # a quick CPU check

Steps: `python -m opensci_patch.fixtures.bigckpt` writes random bf16 weights with the open-sci-ref-v0.01-1.7b
shapes (skipped with --model), `opensci-patch hotfix` makes the loadable copy, then one child process
per target (this interpreter, or the per-release env of each --transformers) measures:

- load: `from_pretrained(dtype=..., attn_implementation=...)` + `.to(device)`, synchronised; the CUDA
  context is created before the clock starts, so it is not counted;
- peak device memory: `torch.cuda.max_memory_allocated` after loading and after decoding (on CPU the
  process's peak RSS instead), against the checkpoint's bytes on disk;
- decode: greedy `generate` of exactly --new-tokens tokens (min = max, so an end-of-text token cannot
  stop it early) after one short warm-up; the median of --repeats runs, as new tokens per second.
  The sha256 of the generated ids is printed too: equal hashes mean the same greedy text.

--json and --markdown write the rows (the markdown table is what results/ holds for the GPU machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

from _measure import child_env, dir_bytes, interpreters, load_note, make_workdir, run

PROBE = r"""
import hashlib, json, resource, statistics, sys, time
from pathlib import Path
import torch
import transformers
from opensci_patch.measure.capture import load_model, load_tokenizer
from opensci_patch.measure.isolation import isolated_hf_cache

model_dir, device, dtype_name, attn = sys.argv[1:5]
new_tokens, repeats = int(sys.argv[5]), int(sys.argv[6])
cuda = device.startswith("cuda")


def sync():
    if cuda:
        torch.cuda.synchronize()


def peak():
    if cuda:
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


out = {"transformers": transformers.__version__, "torch": torch.__version__, "device": device,
       "dtype": dtype_name, "attn": attn}
if cuda:
    torch.zeros(1, device=device)  # create the context before the clock starts
    out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    torch.cuda.reset_peak_memory_stats()
with isolated_hf_cache():
    tok = load_tokenizer(Path(model_dir))
    ids = tok("The capital of France is", return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    sync()
    t0 = time.perf_counter()
    lm = load_model(Path(model_dir), dtype_name, attn, device)  # capture's load path: from_pretrained, to(device)
    sync()
    out["load_s"] = time.perf_counter() - t0
    out["peak_after_load"] = peak()
    out["param_bytes"] = sum(p.numel() * p.element_size() for p in lm.parameters())
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=tok.pad_token_id or 0)
    with torch.no_grad():
        lm.generate(ids, max_new_tokens=8, min_new_tokens=8, **kwargs)  # warm-up: kernels, allocator
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            seq = lm.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            sync()
            times.append(time.perf_counter() - t0)
    generated = seq[0, ids.shape[1]:].tolist()
    out["new_tokens"] = len(generated)
    out["decode_s"] = statistics.median(times)
    out["tokens_per_s"] = len(generated) / out["decode_s"]
    out["greedy_sha256"] = hashlib.sha256(json.dumps(generated).encode()).hexdigest()
    out["peak_after_decode"] = peak()
print("DECODE " + json.dumps(out))
"""

GIB = 1024**3


def markdown(rows: list[dict], ckpt: int, note: str) -> str:
    lines = [
        note,
        "",
        "| transformers | torch | device | dtype | attn | load (s) | peak mem after load (GiB)"
        " | peak mem after decode (GiB) | peak / checkpoint | new tokens | tokens/s | greedy ids sha256 |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['transformers']} | {r['torch']} | {r.get('gpu', r['device'])} | {r['dtype']} | {r['attn']}"
            f" | {r['load_s']:.2f} | {r['peak_after_load'] / GIB:.2f} | {r['peak_after_decode'] / GIB:.2f}"
            f" | {r['peak_after_decode'] / ckpt:.2f}x | {r['new_tokens']} | {r['tokens_per_s']:.1f}"
            f" | `{r['greedy_sha256'][:12]}` |"
        )
    return "\n".join(lines) + "\n"


def _refuse_existing(paths: list[Path | None], force: bool) -> None:
    for path in paths:
        if path is not None and path.exists() and not force:
            raise SystemExit(f"error: {path} exists; pass --force to overwrite it")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[2:4]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", type=Path, help="existing checkpoint dir (original or hotfixed); default: generate one")
    ap.add_argument("--workdir", type=Path, help="where generated/hotfixed dirs go (default: a temp dir, removed)")
    ap.add_argument("--layers", type=int, default=24, help="layers of the generated checkpoint (default 24 = 1.7B)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--transformers",
        action="append",
        default=[],
        metavar="VERSION",
        help="measure in the per-release env of this release (repeatable); default: this interpreter",
    )
    ap.add_argument("--torch", default="system", choices=["system", "cpu", "cuda"], help="torch build of those envs")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    ap.add_argument("--markdown", type=Path, help="write the rows as a markdown table here")
    ap.add_argument("--force", action="store_true", help="overwrite --json/--markdown files")
    args = ap.parse_args(argv)
    if args.new_tokens < 1 or args.repeats < 1:
        ap.error("--new-tokens and --repeats must be at least 1")
    _refuse_existing([args.json, args.markdown], args.force)
    if args.device.startswith("cuda"):
        from opensci_patch.matrix.spec import gpu_present

        if why := gpu_present():
            raise SystemExit(f"error: --device {args.device}: {why}; pass --device cpu to measure on the CPU")

    workdir, temporary = make_workdir(args.workdir, "opensci-bench-decode-")
    env = child_env({"TRANSFORMERS_VERBOSITY": "error"})
    rows: list[dict] = []
    try:
        print(f"# decode_1p7b: python {sys.version.split()[0]}, workdir {workdir}, {load_note()}", flush=True)
        source = args.model
        if source is None:
            source = workdir / f"osr-1p7b-l{args.layers}-s{args.seed}"
            cmd = [sys.executable, "-m", "opensci_patch.fixtures.bigckpt", str(source), "--layers", str(args.layers),
                   "--seed", str(args.seed)]  # fmt: skip
            if not source.exists():
                print(run(cmd, env=env).check().stdout.strip().splitlines()[0], flush=True)
        ckpt = dir_bytes(source, "*.safetensors")
        layers = json.loads((source / "config.json").read_text())["num_hidden_layers"]
        targets = interpreters(args.transformers, args.torch)
        fixed = source
        if not (source / "opensci_patch_manifest.json").is_file():
            fixed = workdir / f"{source.name}_fixed"
            if not fixed.exists():  # in a target's interpreter: envs have libcst, a GPU machine's python may not
                cmd = [targets[0][1], "-m", "opensci_patch.cli", "hotfix", str(source), "--out", str(fixed)]
                run(cmd, env=env).check()
        print(f"checkpoint {source}: {ckpt / GIB:.2f} GiB of safetensors; hotfixed copy {fixed}", flush=True)
        for label, python in targets:
            cmd = [python, "-c", PROBE, str(fixed), args.device, args.dtype, args.attn, str(args.new_tokens),
                   str(args.repeats)]  # fmt: skip
            r = run(cmd, env=env).check()
            row = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("DECODE "))[7:])
            row["wall_s"] = r.wall_s
            rows.append(row)
            print(
                f"{label}: transformers {row['transformers']}, torch {row['torch']} on {row.get('gpu', row['device'])}"
                f" | load {row['load_s']:.2f} s | peak mem after load {row['peak_after_load'] / GIB:.2f} GiB, after"
                f" decode {row['peak_after_decode'] / GIB:.2f} GiB ({row['peak_after_decode'] / ckpt:.2f}x the"
                f" checkpoint) | {row['new_tokens']} new tokens at {row['tokens_per_s']:.1f} tokens/s"
                f" | greedy sha {row['greedy_sha256'][:12]}",
                flush=True,
            )
        shas = {r["greedy_sha256"] for r in rows}
        print(f"greedy ids identical across the {len(rows)} target(s): {len(shas) == 1}")
        print(f"at the end: {load_note()}")
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
    stamp = datetime.date.today().isoformat()
    note = (f"Measured {stamp} with `python benchmarks/decode_1p7b.py` ({layers}-layer 1.7B-shaped checkpoint, "
            f"{ckpt / GIB:.2f} GiB; {args.new_tokens} new tokens, median of {args.repeats}).")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"note": note, "checkpoint_bytes": ckpt, "rows": rows}, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(rows, ckpt, note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
