"""Refuse bad input before any model is built: a ModelDirError or CaptureError (exit 2), never a model failure.

What a model load would only find out late, or as a confusing failure of the model code: an `auto_map` naming a
module file that is not there (or code in another hub repo), config sizes that are not positive integers or
describe a model too big for this memory, a safetensors file whose header or data does not add up, a prompt longer
than the model's positions, token ids past the model's vocabulary.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from opensci_patch._util.errors import CaptureError, ModelDirError
from opensci_patch._util.model_dir import read_config

SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "F4": 4, "F6_E2M3": 6,
    "F6_E3M2": 6, "C64": 64,
}  # fmt: skip


def _check_safetensors(path: Path) -> None:
    """Cheap structural check of a safetensors file: header length, JSON header, data size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelDirError(f"{path}: corrupt safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ModelDirError(f"{path}: corrupt safetensors file (header length {n} > file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelDirError(f"{path}: corrupt safetensors file (header is not JSON)") from None

    def offsets_ok(entry) -> bool:
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        return (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in offsets)
            and offsets[0] <= offsets[1]
        )

    if not isinstance(header, dict):
        raise ModelDirError(
            f"{path}: corrupt safetensors file (header is a JSON {type(header).__name__}, not an object)"
        )
    bad = next((k for k, v in header.items() if k != "__metadata__" and not offsets_ok(v)), None)
    if bad is not None:
        raise ModelDirError(f"{path}: corrupt safetensors file (tensor {bad!r} has no valid data_offsets)")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ModelDirError(f"{path}: corrupt safetensors file (truncated: needs {8 + n + end} bytes, has {size})")
    # what the safetensors loader checks when the model loads: known dtypes, each tensor's bytes = its shape x its
    # dtype's size, and the tensors tile the data with no gap or overlap (else a load-error, not bad input)
    position = 0
    tensors = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    for name, entry in tensors:
        dtype, shape = entry.get("dtype"), entry.get("shape")
        if dtype not in SAFETENSORS_DTYPE_BITS:
            raise ModelDirError(f"{path}: corrupt safetensors file (tensor {name!r} has unknown dtype {dtype!r})")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):  # fmt: skip
            raise ModelDirError(f"{path}: corrupt safetensors file (tensor {name!r} has no valid shape)")
        start, stop = entry["data_offsets"]
        count = 1
        for d in shape:
            count *= d
        if start != position or (stop - start) * 8 != count * SAFETENSORS_DTYPE_BITS[dtype]:
            raise ModelDirError(
                f"{path}: corrupt safetensors file (tensor {name!r}: data_offsets {entry['data_offsets']} do not "
                f"fit its shape {shape} and dtype {dtype} after the previous tensor's end at {position})"
            )
        position = stop


def check_auto_map(model: Path, data: dict) -> None:
    """Every `auto_map` entry names a module file that is in the directory (else bad input, not a model failure)."""
    auto_map = data.get("auto_map")
    if auto_map is None:
        return
    if not isinstance(auto_map, dict):
        raise ModelDirError(f"{model / 'config.json'}: auto_map is a JSON {type(auto_map).__name__}, not an object")
    for key, ref in auto_map.items():
        for one in ref if isinstance(ref, list) else [ref]:
            if one is None:
                continue
            if not isinstance(one, str) or "." not in one:
                raise ModelDirError(f"{model / 'config.json'}: auto_map[{key!r}] = {one!r} is not 'module.Class'")
            if "--" in one:  # transformers fetches `repo--module.Class` from that hub repo, whatever is here
                raise ModelDirError(
                    f"{model / 'config.json'}: auto_map[{key!r}] = {one!r} names code in the hub repo "
                    f"{one.split('--')[0]}, not in the directory; copy that file here and name it 'module.Class'"
                )
            module = one.rsplit(".", 1)[0]
            if not (model / f"{module.replace('.', '/')}.py").is_file():
                raise ModelDirError(f"{model}: auto_map[{key!r}] names {module}.py, which is not in the directory")


# size fields of a Llama/Qwen3-style config: positive integers; the model is built from them before any weight loads
SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "max_position_embeddings")  # fmt: skip


def estimated_parameters(data: dict) -> int | None:
    """Parameters a Llama/Qwen3-style model of this config has (embeddings, attention, MLP); None if unknown."""
    try:
        h, n_layers, vocab = data["hidden_size"], data["num_hidden_layers"], data["vocab_size"]
        inter, heads = data["intermediate_size"], data["num_attention_heads"]
    except KeyError:
        return None
    kv = data.get("num_key_value_heads") or heads
    hd = data.get("head_dim") or h // heads
    attn = 2 * h * heads * hd + 2 * h * kv * hd
    per_layer = attn + 3 * h * inter
    emb = vocab * h * (1 if data.get("tie_word_embeddings", True) else 2)
    return n_layers * per_layer + emb


def available_memory() -> int | None:
    """MemAvailable (Linux), else the physical memory; None where neither is known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_sizes(config: Path, data: dict, bytes_per_parameter: int = 2) -> None:
    """Refuse, before a model is built, sizes that are not positive integers or a model that cannot fit in memory
    (`num_hidden_layers` 1e23 used to run 25 minutes and then run out of memory)."""
    for key in SIZE_FIELDS:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ModelDirError(f"{config}: {key} = {value!r} is not a positive integer")
    params, memory = estimated_parameters(data), available_memory()
    if params is not None and memory is not None and params * bytes_per_parameter > memory:
        raise ModelDirError(
            f"{config}: the model it describes has ~{params:.3g} parameters ({params * bytes_per_parameter / 2**30:.3g}"
            f" GiB at {bytes_per_parameter} bytes each), more than the {memory / 2**30:.3g} GiB of memory available"
        )


def validate_model_dir(model: Path) -> None:
    """Fail early, with one clear line, on input that is not a loadable model directory."""
    if not model.exists():
        raise ModelDirError(f"{model}: no such directory")
    if not model.is_dir():
        raise ModelDirError(f"{model}: not a directory; point at a model directory")
    config = model / "config.json"
    if not config.is_file():
        raise ModelDirError(f"{model}: no config.json; not a model directory")
    data = read_config(config.parent)
    check_auto_map(model, data)
    check_sizes(config, data)
    weights = sorted(model.glob("*.safetensors"))
    if not weights:
        raise ModelDirError(f"{model}: no *.safetensors weights")
    for w in weights:
        _check_safetensors(w)


def check_token_ids(model: Path, ids: list[int], what: str) -> None:
    """Refuse token ids past the model's `vocab_size` (a tokenizer that is not this model's): the embedding lookup
    would fail with "index out of range in self", recorded as a failure of the model."""
    vocab = read_config(model).get("vocab_size")
    if isinstance(vocab, int) and ids and max(ids) >= vocab:
        raise ModelDirError(
            f"{model}: the tokenizer gives token id {max(ids)} for {what}, but config.json's vocab_size is {vocab} "
            f"(ids 0 to {vocab - 1}): the tokenizer does not belong to this model"
        )


def check_prompt_length(model: Path, tokens: int) -> None:
    """Refuse (exit 2, before the model is built) a prompt longer than the model's positions, or one whose
    attention scores (heads x tokens^2 floats per layer, eager) would not fit in memory (a 100k-character
    prompt used to run out of memory after a warning)."""
    data = read_config(model)
    limit = data.get("max_position_embeddings")
    if isinstance(limit, int) and tokens > limit:
        raise CaptureError(
            f"the prompt is {tokens} tokens, more than the model's max_position_embeddings ({limit}); shorten --prompt"
        )
    heads, memory = data.get("num_attention_heads"), available_memory()
    if isinstance(heads, int) and memory is not None and heads * tokens * tokens * 4 > memory // 2:
        raise CaptureError(
            f"the prompt is {tokens} tokens: its attention scores ({heads} heads x {tokens}^2 floats) need more than "
            f"half the {memory / 2**30:.3g} GiB of memory available; shorten --prompt"
        )
