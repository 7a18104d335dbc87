"""Write a full-size (1.7B-shaped) open-sci checkpoint with random weights, for memory and speed tests.

    python -m opensci_patch.bigckpt OUT [--layers N] [--seed S] [--shard-size 1GiB] ...

Same architecture, tensor names and shapes as open-sci-ref-v0.01-1.7b (hidden 2048, 24 layers,
32 heads of 64 with 32 KV heads, MLP 8192, vocab 50304, tied embeddings, biases on q/k/v/o and
the MLP, per-head q/k RMSNorm, rope_theta 100000 as in the "rope_theta-100k" release, 4096
positions), stored like the real upload: bf16 safetensors shards
``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``. The model code
(``configuration_opensci.py``, ``modeling_opensci.py``, unpatched) and the tokenizer come from the
shipped fixture; its tokenizer has 512 tokens, all valid rows of the 50304-row embedding.

Memory: the shard layout is planned from the shapes alone, each shard's safetensors header is
written first and then every tensor is generated, written and freed one at a time, so the
generator holds at most one tensor (the 50304 x 2048 embedding, 206 MB in bf16) plus a 64 MB
float32 scratch chunk, whatever the shard size. Values: N(0, std) for matrices, ones for norm
weights, zeros for biases, drawn from a generator seeded by (seed, tensor name): the same seed
gives the same bytes on the same torch build, independent of the shard size and of how many
layers come after.

The output is built in a hidden sibling directory and renamed into place when complete; an
existing non-empty OUT is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .defaults import FIXTURE_DIR
from .errors import DestinationError, OpensciPatchError

COPIED_FILES = (
    "configuration_opensci.py",
    "modeling_opensci.py",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 1 << 30
CHUNK_ELEMENTS = 1 << 24  # float32 scratch per draw: 64 MB
BF16_BYTES = 2
GB = 1e9

if TYPE_CHECKING:
    import torch

Log = Callable[[str], None]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # "normal" | "ones" | "zeros"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * BF16_BYTES


def make_config(
    *,
    layers: int = 24,
    hidden: int = 2048,
    intermediate: int = 8192,
    heads: int = 32,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    vocab: int = 50304,
    max_positions: int = 4096,
    rope_theta: float = 100000.0,
) -> dict:
    """config.json: the fixture's, with the given (default: 1.7B) shapes and torch_dtype bfloat16.

    Every refusal is an OpensciPatchError (one line, exit 2), checked before anything is derived from
    the sizes (hidden // heads with heads=0 was a ZeroDivisionError traceback).
    """
    given = {"layers": layers, "hidden": hidden, "intermediate": intermediate, "heads": heads, "kv_heads": kv_heads,
             "head_dim": head_dim, "vocab": vocab, "max_positions": max_positions}  # fmt: skip
    if bad := [f"{k}={v}" for k, v in given.items() if v is not None and (not isinstance(v, int) or v < 1)]:
        raise OpensciPatchError(f"sizes must be positive integers: {', '.join(bad)}")
    if not (math.isfinite(rope_theta) and rope_theta > 1):
        raise OpensciPatchError(f"rope_theta ({rope_theta}) must be a finite number above 1")
    kv_heads = heads if kv_heads is None else kv_heads
    head_dim = hidden // heads if head_dim is None else head_dim
    sizes = {
        "layers": layers,
        "hidden": hidden,
        "intermediate": intermediate,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab": vocab,
        "max_positions": max_positions,
    }
    if bad := [f"{k}={v}" for k, v in sizes.items() if v < 1]:
        raise OpensciPatchError(f"sizes must be positive: {', '.join(bad)}")
    if heads % kv_heads:
        raise OpensciPatchError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if head_dim % 2:
        raise OpensciPatchError(f"head_dim ({head_dim}) must be even (RoPE rotates channel pairs)")
    if vocab < 512:
        raise OpensciPatchError(f"vocab ({vocab}) must be at least 512, the size of the shipped tokenizer")
    cfg = json.loads((FIXTURE_DIR / "config.json").read_text())
    cfg.update(
        {
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "vocab_size": vocab,
            "max_position_embeddings": max_positions,
            "rope_theta": float(rope_theta),
            "torch_dtype": "bfloat16",
        }
    )
    return dict(sorted(cfg.items()))


def tensor_specs(cfg: dict) -> list[TensorSpec]:
    """Every stored tensor in checkpoint order (tied head: no lm_head entry)."""
    d, ff, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    specs = [TensorSpec("model.embed_tokens.weight", (cfg["vocab_size"], d), "normal")]
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}"
        specs.append(TensorSpec(f"{pre}.input_layernorm.weight", (d,), "ones"))
        linears = {
            "self_attn.q_proj": (n_heads * hd, d),
            "self_attn.k_proj": (n_kv * hd, d),
            "self_attn.v_proj": (n_kv * hd, d),
            "self_attn.o_proj": (d, n_heads * hd),
        }
        for name, shape in linears.items():
            specs += [
                TensorSpec(f"{pre}.{name}.weight", shape, "normal"),
                TensorSpec(f"{pre}.{name}.bias", shape[:1], "zeros"),
            ]
        specs += [
            TensorSpec(f"{pre}.self_attn.q_norm.weight", (hd,), "ones"),
            TensorSpec(f"{pre}.self_attn.k_norm.weight", (hd,), "ones"),
            TensorSpec(f"{pre}.post_attention_layernorm.weight", (d,), "ones"),
        ]
        for name, shape in {"mlp.gate_proj": (ff, d), "mlp.up_proj": (ff, d), "mlp.down_proj": (d, ff)}.items():
            specs += [
                TensorSpec(f"{pre}.{name}.weight", shape, "normal"),
                TensorSpec(f"{pre}.{name}.bias", shape[:1], "zeros"),
            ]
    specs.append(TensorSpec("model.norm.weight", (d,), "ones"))
    return specs


def plan_shards(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, in order: a shard takes tensors until the next would push it over `shard_bytes`.

    A tensor larger than `shard_bytes` gets a shard of its own (as transformers' own sharding does).
    """
    if shard_bytes < 1:
        raise OpensciPatchError(f"shard size must be positive, got {shard_bytes}")
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: values do not depend on shard layout or on the tensors around it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def make_tensor(spec: TensorSpec, seed: int, std: float = 0.02) -> torch.Tensor:
    """One bf16 tensor; normal values drawn in float32 chunks (bounded scratch), then rounded."""
    import torch

    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=torch.bfloat16)
    if spec.init == "zeros":
        return torch.zeros(spec.shape, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
    out = torch.empty(spec.numel, dtype=torch.bfloat16)
    for start in range(0, spec.numel, CHUNK_ELEMENTS):
        n = min(CHUNK_ELEMENTS, spec.numel - start)
        chunk = torch.randn(n, generator=gen, dtype=torch.float32)
        chunk.mul_(std)
        out[start : start + n].copy_(chunk)
        del chunk
    return out.view(spec.shape)


def _header(shard: list[TensorSpec]) -> bytes:
    """A safetensors header: u64 length + JSON (8-byte aligned with spaces), offsets in shard order."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        end = offset + spec.nbytes
        entries[spec.name] = {"dtype": "BF16", "shape": list(spec.shape), "data_offsets": [offset, end]}
        offset = end
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


def _write_shard(path: Path, shard: list[TensorSpec], seed: int, std: float) -> Iterator[TensorSpec]:
    """Write one shard tensor by tensor; yields each spec once its bytes are written."""
    import torch

    with path.open("wb") as f:
        f.write(_header(shard))
        for spec in shard:
            t = make_tensor(spec, seed, std)
            f.write(t.view(-1).view(torch.uint8).numpy().data)
            del t
            yield spec


def human(n: float) -> str:
    """Bytes for people: 3.42 GB, 131.2 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _check_destination(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DestinationError(f"{out} exists and is not a directory; choose another output path")
    if out.is_dir() and any(out.iterdir()):
        raise DestinationError(f"{out} exists and is not empty; choose another output path or remove it first")


def generate(
    out: Path,
    *,
    seed: int = 0,
    std: float = 0.02,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    log: Log = print,
    **shape: int | float | None,
) -> Path:
    """Write the checkpoint to `out` (must not exist or be an empty dir); returns `out`.

    `shape`: the keywords of `make_config` (layers, hidden, ...; default: the 1.7B shapes).

    Raises DestinationError for an unusable `out` or too little free disk space.
    """
    if sys.byteorder != "little":  # safetensors stores little-endian; we write raw tensor memory
        raise OpensciPatchError("bigckpt writes raw little-endian tensor bytes; this machine is big-endian")
    if not (math.isfinite(std) and std > 0):
        raise OpensciPatchError(f"std ({std}) must be a finite positive number")
    out = Path(out)
    _check_destination(out)
    cfg = make_config(**shape)
    _check_free_space(out, _checkpoint_bytes(cfg))  # before listing the tensors: --layers 1000000000 would not fit
    specs = tensor_specs(cfg)
    shards = plan_shards(specs, shard_bytes)
    total = sum(s.nbytes for s in specs)
    n_params = sum(s.numel for s in specs)

    parent = _check_free_space(out, total)
    log(
        f"generating {n_params / 1e9:.3f}B parameters ({len(specs)} tensors, {human(total)} bf16) "
        f"in {len(shards)} shard(s) of <= {human(shard_bytes)}, seed {seed} -> {out}"
    )

    partial = parent / f".{out.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    start = time.monotonic()
    try:
        weight_map: dict[str, str] = {}
        written = count = 0
        for i, shard in enumerate(shards, 1):
            name = shard_name(i, len(shards))
            for spec in _write_shard(partial / name, shard, seed, std):
                weight_map[spec.name] = name
                written += spec.nbytes
                count += 1
            log(
                f"  [{i}/{len(shards)}] {name}: {len(shard)} tensors | {count}/{len(specs)} tensors, "
                f"{human(written)}/{human(total)} written | {time.monotonic() - start:.1f} s"
            )
        index = {"metadata": {"total_size": total, "total_parameters": n_params}, "weight_map": weight_map}
        (partial / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (partial / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for f in COPIED_FILES:
            shutil.copyfile(FIXTURE_DIR / f, partial / f)
        _check_destination(out)  # nobody wrote there meanwhile
        if out.is_dir():
            out.rmdir()
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log(
        f"wrote {out} ({human(total)}, {len(shards)} shard(s)) in {time.monotonic() - start:.1f} s; "
        f"peak RSS of the generator {human(peak_rss_bytes())}"
    )
    return out


def _checkpoint_bytes(cfg: dict) -> int:
    """The size of the tensors `tensor_specs(cfg)` lists, computed from one layer (no list of every tensor)."""
    one = tensor_specs({**cfg, "num_hidden_layers": 1})
    outside = [s for s in one if not s.name.startswith("model.layers.")]
    per_layer = sum(s.nbytes for s in one) - sum(s.nbytes for s in outside)
    return sum(s.nbytes for s in outside) + per_layer * cfg["num_hidden_layers"]


def _check_free_space(out: Path, total: int) -> Path:
    """Create OUT's parent; refuse when it has less free space than the checkpoint needs. Returns the parent."""
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DestinationError(f"cannot create {parent}: {exc.strerror}; choose another output path") from None
    free = shutil.disk_usage(parent).free
    if free < total + (64 << 20):
        raise DestinationError(f"{parent}: {human(free)} free, the checkpoint needs {human(total)}")
    return parent


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """'1GiB', '500MB', '65536' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 1GiB, 500MB, 65536)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be at least one byte")
    return value


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The generator's options, for this module's parser and for a CLI subcommand."""
    ap.add_argument("out", type=Path, help="output directory (must not exist, or be empty)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    ap.add_argument("--head-dim", type=int, default=None, help="default: hidden / heads")
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--max-positions", type=int, default=4096)
    ap.add_argument("--rope-theta", type=float, default=100000.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02, help="standard deviation of the weight matrices")
    ap.add_argument(
        "--shard-size",
        type=parse_size,
        default=DEFAULT_SHARD_BYTES,
        help="maximum bytes per shard, e.g. 1GiB (default), 500MB, 65536",
    )
    ap.add_argument("--quiet", action="store_true", help="print only the output path")


def run_args(args: argparse.Namespace) -> Path:
    """Generate from parsed `add_arguments` options; raises OpensciPatchError on refusal."""
    log: Log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    out = generate(
        args.out,
        layers=args.layers,
        hidden=args.hidden,
        intermediate=args.intermediate,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        vocab=args.vocab,
        max_positions=args.max_positions,
        rope_theta=args.rope_theta,
        seed=args.seed,
        std=args.std,
        shard_bytes=args.shard_size,
        log=log,
    )
    if args.quiet:
        print(out)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m opensci_patch.bigckpt",
        description="Write a 1.7B-shaped open-sci checkpoint (random bf16 weights, sharded safetensors). "
        "Defaults are the open-sci-ref-v0.01-1.7b shapes; shrink them for tests.",
    )
    add_arguments(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_args(args)
    except OpensciPatchError as exc:
        print(f"opensci-patch bigckpt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("opensci-patch bigckpt: error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
