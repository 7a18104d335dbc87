"""Load a model with the installed transformers, run one forward and greedy generation, record it.

The record is what every later step compares: the logit and rank of the target token
(" Paris"), the top-k, a sha256 of the whole last-position logit vector (bit identity),
greedy generation, the fp64 reference gap, and the environment it ran in.

Isolation: remote code is copied by transformers into a modules cache; a stale copy there
silently runs old code. `isolated_hf_cache()` gives each run a fresh, private modules cache
and `HF_HUB_OFFLINE=1`; the CLI enters it before transformers is imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import struct
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from opensci_patch._util.defaults import (
    ATTENTION,
    DEFAULT_PROMPT,
    DEFAULT_TARGET,
    DTYPES,
    MANIFEST,
    MAX_NEW_TOKENS,
    OLDEST_SUPPORTED,
)
from opensci_patch._util.errors import CaptureError, ModelDirError
from opensci_patch._util.model_dir import read_config
from opensci_patch.measure.records import (
    ErrorInfo,
    Fp64Reference,
    Generation,
    KVCheck,
    Record,
    Status,
    Target,
    TopToken,
    error_info,
    one_line,
)

# The fp64 reference needs ~8 bytes per parameter on the CPU: skip it above this size.
REFERENCE_MAX_WEIGHT_BYTES = 1 << 30
# KV-cache self-check: max |step logits with the cache - the same step recomputed without one|.
# Measured on the shipped checkpoint (fp32 eager/SDPA: <= 1e-5; bf16: <= 0.13; a forward that drops
# its cache: >= 2 in every dtype), see docs/upstream.md.
KV_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.1}
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps|xpu(:\d+)?)$")


@dataclass
class CaptureSettings:
    model: Path
    device: str = "cpu"
    dtype: str = "float32"
    attn: str = "eager"
    prompt: str = DEFAULT_PROMPT
    target: str = DEFAULT_TARGET
    max_new_tokens: int = MAX_NEW_TOKENS
    top_k: int = 10
    shim: bool = False
    reference: str = "auto"  # auto | on | off


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
            module = one.split("--")[-1].rsplit(".", 1)[0]
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


def _forget_remote_modules() -> None:
    """Drop the `transformers_modules` package (remote code) from sys.modules: its path is a modules cache."""
    import importlib

    for name in [n for n in sys.modules if n == "transformers_modules" or n.startswith("transformers_modules.")]:
        del sys.modules[name]
    importlib.invalidate_caches()


@contextlib.contextmanager
def isolated_hf_cache() -> Iterator[Path]:
    """A fresh, private HF modules cache and offline hub for the duration of one capture."""
    tmp = Path(tempfile.mkdtemp(prefix="opensci-hf-modules-"))
    settings = {
        "HF_MODULES_CACHE": str(tmp),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    if "transformers.utils" in sys.modules:  # a later import of dynamic_module_utils would copy the stale path
        import transformers.dynamic_module_utils  # noqa: F401
    dmu = sys.modules.get("transformers.dynamic_module_utils")
    old_cache = getattr(dmu, "HF_MODULES_CACHE", None)
    if dmu is not None:  # transformers already imported: it read the variable at import time
        dmu.HF_MODULES_CACHE = str(tmp)
    _forget_remote_modules()  # a second capture in one process must not import from the first one's cache
    try:
        yield tmp
    finally:
        _forget_remote_modules()
        if dmu is not None:
            dmu.HF_MODULES_CACHE = old_cache
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


def _model_info(model: Path) -> dict:
    manifest = model / MANIFEST
    info: dict = {"path": str(model), "name": model.name, "patched": manifest.is_file()}
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        info["patches"] = data.get("patches")
    info["modeling_sha256"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model.glob("*.py"))}
    return info


def _environment(device: str) -> dict:
    import torch
    import transformers

    from opensci_patch.measure import compat

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "probes": compat.probes(),
        # the `kernels` package (transformers 5.25 turns hub kernels on by default); "used" is filled after loading
        "kernels": {"installed": _distribution_version("kernels"), "used": None},
        # dependency overrides the per-release env was built with (opensci_patch.matrix.overrides); [] outside one
        "overrides": _env_overrides(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def _distribution_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _env_overrides() -> list[str]:
    """The overrides in the marker of the per-release env this interpreter runs in (`envs`); [] elsewhere."""
    from opensci_patch._util.locations import MARKER

    try:
        marker = json.loads((Path(sys.prefix) / MARKER).read_text())
    except (OSError, ValueError):
        return []
    found = marker.get("overrides", []) if isinstance(marker, dict) else []
    return [str(r) for r in found] if isinstance(found, list) else []


def _weights_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.glob("*.safetensors"))


def target_token_id(tokenizer, target: str) -> int:
    ids = tokenizer.encode(target, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise CaptureError(
            f"target {target!r} is {len(ids)} tokens {pieces}, not one; pass --target with a single token"
        )
    return ids[0]


def target_rank(logits, token_id: int) -> int | None:
    """1-based rank of `token_id` in a 1-D logit vector; None when its logit is not finite.

    Broken RoPE (garbage `inv_freq`) can make logits NaN, and NaN compares false with
    everything: a plain count of larger logits would call it rank 1.
    """
    import torch

    value = logits[token_id]
    if not bool(torch.isfinite(value)):
        return None
    return int((logits > value).sum()) + 1


def logits_sha256(vector) -> str:
    """sha256 over the raw bytes of a 1-D logit vector, in the dtype the model produced."""
    import torch

    t = vector.detach().cpu().contiguous()
    as_int = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype]
    return hashlib.sha256(t.view(as_int).numpy().tobytes()).hexdigest()


class _Collect(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, rec: logging.LogRecord) -> None:
        try:
            message = rec.getMessage()
        except (TypeError, ValueError):  # a library's bad %-format (5.2.0's attn-mask deprecation) is not our crash
            message = f"{rec.msg} (args {rec.args!r})"
        self.sink.append(f"{rec.name}: {message}")


@contextlib.contextmanager
def collected_warnings() -> Iterator[list[str]]:
    """Collect Python warnings and transformers' logger warnings instead of printing them.

    They are evidence for diagnosis (kept in the record) and noise for a one-line error.
    The yielded list is filled (sorted, de-duplicated) when the block ends.
    """
    sink: list[str] = []
    seen: list[str] = []
    handler = _Collect(seen)
    hf_logger = logging.getLogger("transformers")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_logger.addHandler(handler)
        try:
            yield sink
        finally:
            hf_logger.removeHandler(handler)
            sink[:] = sorted(set(seen + [f"{w.category.__name__}: {w.message}" for w in caught]))


def load_tokenizer(model: Path):
    """The model dir's tokenizer, quietly; an unusable one is a ModelDirError (bad input)."""
    import transformers.utils.logging as hf_logging
    from transformers import AutoTokenizer

    hf_logging.disable_progress_bar()  # one bar line per tensor would drown the report
    hf_logging.disable_default_handler()  # warnings go to collected_warnings() instead
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model), trust_remote_code=True)
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure means the dir is unusable
        why = one_line(str(exc)) or "no message"
        raise ModelDirError(f"{model}: cannot load the tokenizer ({type(exc).__name__}: {why})") from None
    special = set(tokenizer.all_special_tokens)
    if len(tokenizer) <= len(special) + 1:  # loaded from tokenizer_config.json alone: no vocabulary at all
        missing = "tokenizer.json is missing" if not (model / "tokenizer.json").exists() else "no vocabulary in it"
        raise ModelDirError(
            f"{model}: cannot load the tokenizer ({missing}: it has {len(tokenizer)} token(s), only special ones)"
        )
    return tokenizer


def load_model(model: Path, dtype: str, attn: str, device: str):
    """`from_pretrained` with remote code, the dtype keyword this release takes, then to(device).

    Exceptions from the model code propagate: callers record them as results.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from opensci_patch.measure import compat

    lm, info = AutoModelForCausalLM.from_pretrained(
        str(model),
        trust_remote_code=True,
        attn_implementation=attn,
        output_loading_info=True,
        ignore_mismatched_sizes=True,  # reported in the loading info by name (`check_loading_info`), never loaded
        **{compat.dtype_keyword(): getattr(torch, dtype)},
    )
    check_loading_info(lm, info)
    return lm.to(device).eval()


class WeightsMismatch(Exception):
    """The checkpoint's tensors are not the model's: some left at their random init, or some never used."""


def _names(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def check_loading_info(lm, info: dict) -> None:
    """Raise `WeightsMismatch` when `from_pretrained` reports missing, unexpected or mismatched keys.

    A missing key whose tensor is tied to a loaded one (lm_head to the embeddings) is not missing.
    Without this a checkpoint with fewer layers than its config loads "ok" with random layers.
    """
    state = lm.state_dict(keep_vars=True)
    missing = sorted(set(info.get("missing_keys") or []))
    loaded = {state[k].data_ptr() for k in state if k not in missing}
    missing = [k for k in missing if k not in state or state[k].data_ptr() not in loaded]
    unexpected = sorted(set(info.get("unexpected_keys") or []))
    mismatched = sorted(
        f"{m[0]}: {tuple(m[1])} in the checkpoint, {tuple(m[2])} in the model"
        if isinstance(m, (tuple, list)) and len(m) == 3
        else str(m[0] if isinstance(m, (tuple, list)) else m)
        for m in info.get("mismatched_keys") or []
    )
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) the model needs are not in the checkpoint ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} checkpoint tensor(s) the model does not use ({_names(unexpected)})")
    if mismatched:
        parts.append(f"{len(mismatched)} tensor(s) of the wrong shape ({_names(mismatched)})")
    if parts:
        raise WeightsMismatch("; ".join(parts) + ": check num_hidden_layers and the other sizes in config.json")


def capture(settings: CaptureSettings, log=print) -> Record:
    """Run one capture with the installed torch/transformers. Call inside `isolated_hf_cache()`.

    Raises OpensciPatchError for bad input; failures of the model code itself (import,
    load, forward, generate) are recorded in the returned record's status and error.
    Library warnings go into the record (`collected_warnings`), not onto stderr.
    """
    with collected_warnings() as seen:
        record = _capture(settings, log)
    record.warnings = seen
    return record


def check_settings(settings: CaptureSettings) -> None:
    """Refuse bad input up front (exit 2), so it is never recorded as a failure of the model."""
    if settings.dtype not in DTYPES:
        raise CaptureError(f"dtype {settings.dtype!r} not one of {', '.join(DTYPES)}")
    if settings.attn not in ATTENTION:
        raise CaptureError(f"attention {settings.attn!r} not one of {', '.join(ATTENTION)}")
    if not _DEVICE.match(settings.device):
        raise CaptureError(f"device {settings.device!r} is not a device; use cpu or cuda[:N]")
    if not settings.prompt:
        raise CaptureError("the prompt is empty; pass --prompt with some text")
    if settings.max_new_tokens < 1:
        raise CaptureError(f"--max-new-tokens must be at least 1 (got {settings.max_new_tokens})")
    if settings.top_k < 1:
        raise CaptureError(f"top_k must be at least 1 (got {settings.top_k})")
    if settings.reference not in ("auto", "on", "off"):
        raise CaptureError(f"reference {settings.reference!r} not one of auto, on, off")


def check_release() -> None:
    """Refuse a transformers older than the oldest supported release before any probe runs on it."""
    import transformers
    from packaging.version import Version

    oldest = Version(OLDEST_SUPPORTED).release[:2]  # by minor, as before: a 4.48 pre-release is supported too
    if Version(transformers.__version__).release[:2] < oldest:
        wanted = ".".join(map(str, oldest))
        raise CaptureError(
            f"transformers {transformers.__version__} is unsupported (< {wanted}); install {wanted} or newer"
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


def _capture(settings: CaptureSettings, log) -> Record:
    model = Path(settings.model)
    check_settings(settings)
    validate_model_dir(model)
    if settings.device == "cpu":  # the model is built in this dtype in this memory
        size = {"float32": 4, "bfloat16": 2, "float16": 2}[settings.dtype]
        check_sizes(model / "config.json", read_config(model), size)

    import torch

    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise CaptureError(
            f"device {settings.device!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU"
        )
    check_release()

    from opensci_patch.measure import compat

    record = Record(
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        environment=_environment(settings.device),
        model=_model_info(model),
    )
    record.environment["shim_installed"] = compat.install_transformers_kwargs_shim() if settings.shim else False

    tokenizer = load_tokenizer(model)
    target_id = target_token_id(tokenizer, settings.target)
    input_ids = tokenizer(settings.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if input_ids.shape[1] == 0:
        raise CaptureError(f"the prompt {settings.prompt!r} encodes to no tokens; pass --prompt with some text")
    record.input_ids = input_ids[0].tolist()
    check_prompt_length(model, input_ids.shape[1])

    t0 = time.perf_counter()
    log(f"loading {model} ({settings.dtype}, {settings.attn}, {settings.device})")
    try:
        lm = load_model(model, settings.dtype, settings.attn, settings.device)
    except WeightsMismatch as exc:
        record.status, record.error = Status.WEIGHTS_MISMATCH, error_info(exc)
        return record
    except Exception as exc:  # noqa: BLE001 - the model code failing to load is a result, not a crash
        record.status, record.error = Status.LOAD_ERROR, error_info(exc)
        from opensci_patch.measure.library_modules import explain, missing_module

        module = missing_module(exc)
        if module:  # the release lacks a library module the model uses: say which, not a traceback's last line
            record.error = replace(
                record.error, type="MissingLibraryModule", message=explain(module, record.environment["transformers"])
            )
        return record
    record.timings["load_s"] = round(time.perf_counter() - t0, 3)
    record.environment["kernels"]["used"] = bool(getattr(lm, "use_kernels", False))
    limit = getattr(lm.config, "max_position_embeddings", None)
    if isinstance(limit, int) and input_ids.shape[1] + settings.max_new_tokens > limit:
        message = (
            f"prompt ({input_ids.shape[1]} tokens) + --max-new-tokens {settings.max_new_tokens} exceeds the model's "
            f"max_position_embeddings ({limit}): positions past it were never trained"
        )
        log(f"warning: {message}")
        warnings.warn(message, stacklevel=1)

    input_ids = input_ids.to(settings.device)
    try:
        with torch.no_grad():
            logits = lm(input_ids=input_ids).logits[0, -1]
    except Exception as exc:  # noqa: BLE001
        record.status, record.error = Status.FORWARD_ERROR, error_info(exc)
        return record
    record.timings["forward_s"] = round(time.perf_counter() - t0 - record.timings["load_s"], 3)
    record.logits_sha256 = logits_sha256(logits)
    f32 = logits.float().cpu()
    rank = target_rank(f32, target_id)
    record.target = Target(settings.target, target_id, float(f32[target_id]), rank)
    top = torch.topk(f32, min(settings.top_k, f32.numel()))
    record.topk = tuple(
        TopToken(int(i), tokenizer.decode([int(i)]), float(v)) for v, i in zip(top.values, top.indices, strict=True)
    )
    bad = int((~torch.isfinite(f32)).sum())
    if bad:
        record.status = Status.NONFINITE_LOGITS
        record.error = ErrorInfo(
            "NonFiniteLogits",
            f"{bad} of {f32.numel()} last-position logits are NaN or infinite (broken weights or buffers)",
            "",
        )
        return record

    if settings.reference == "on" or (
        settings.reference == "auto" and _weights_bytes(model) <= REFERENCE_MAX_WEIGHT_BYTES
    ):
        from opensci_patch.measure import reference

        cfg = reference.resolved_config(model, lm.config)
        ref = reference.forward(reference.load_params(model), cfg, input_ids.cpu())[0, -1]
        record.reference = Fp64Reference("float64", float((f32.double() - ref).abs().max()), float(ref[target_id]))

    t1 = time.perf_counter()
    try:
        record.generation = generate_and_check(lm, tokenizer, input_ids, settings)
    except Exception as exc:  # noqa: BLE001
        record.status, record.error = Status.GENERATE_ERROR, error_info(exc)
        return record
    record.timings["generate_s"] = round(time.perf_counter() - t1, 3)
    kv = record.generation.kv_check
    if not kv.ok:
        record.status = Status.GENERATE_MISMATCH
        record.error = ErrorInfo("KVCacheMismatch", kv.detail, "")
    return record


def generate_and_check(lm, tokenizer, input_ids, settings: CaptureSettings) -> Generation:
    """Greedy decoding with the KV cache, checked step by step against the same steps without one.

    A single forward proves nothing about generation: a forward that loses its cache (5.24 passes it
    as `cache=`) gives the right first logits and wrong text from token 2. So each decode step's
    logits (as `generate` saw them) are compared with a full forward over the prompt and the tokens
    generated so far, with no cache. Needs no other release. Also returns a sha256 per step, which
    the report compares with the reference cell's.
    """
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = lm.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=settings.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            output_logits=True,
            return_dict_in_generate=True,
        )
    prompt_len = input_ids.shape[1]
    sequence = out.sequences[0]
    new = sequence[prompt_len:].tolist()
    steps = [step[0] for step in out.logits]
    tolerance = KV_TOLERANCE[settings.dtype]
    worst, first_bad, detail = 0.0, None, ""
    with torch.no_grad():
        for i, cached in enumerate(steps):
            full = lm(input_ids=sequence[None, : prompt_len + i], use_cache=False).logits[0, -1].float().cpu()
            cached = cached.float().cpu()
            diff = float((cached - full).abs().max()) if bool(torch.isfinite(cached).all()) else float("inf")
            worst = max(worst, diff)
            chosen = new[i] if i < len(new) else int(cached.argmax())
            best = int(full.argmax())
            # a token counts as different only when the no-cache logits prefer another one by more than the tolerance
            token_bad = chosen != best and float(full[best] - full[chosen]) > tolerance
            if first_bad is None and (diff > tolerance or token_bad):
                first_bad = i
                got, want = tokenizer.decode([chosen]), tokenizer.decode([best])
                what = f"token {got!r} where the no-cache forward gives {want!r}; "
                detail = (
                    f"decode step {i}: "
                    + (what if token_bad else "")
                    + f"logits with the KV cache differ from the no-cache recomputation by {diff:.3g} "
                    f"(tolerance {tolerance:g} for {settings.dtype})"
                )
    return Generation(
        ids=tuple(new),
        text=tokenizer.decode(new, skip_special_tokens=True),
        step_logits_sha256=tuple(logits_sha256(step) for step in steps),
        kv_check=KVCheck(
            ok=first_bad is None,
            tolerance=tolerance,
            max_abs_diff=worst,
            first_bad_step=first_bad,
            detail=detail or f"{len(steps)} decode steps agree with the no-cache recomputation (max diff {worst:.3g})",
        ),
    )
