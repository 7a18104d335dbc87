"""Load a model with the installed transformers, run one forward and greedy generation, record it.

The record is what every later step compares: the logit and rank of the target token
(" Paris"), the top-k, a sha256 of the whole last-position logit vector (bit identity),
greedy generation, the fp64 reference gap, and the environment it ran in.

Bad input is refused before any model is built (`input_checks`); each decode step is checked
against the same step without the KV cache (`kv_check`); the record's `environment` and `model`
come from `provenance`.

A capture runs inside `isolation.isolated_hf_cache()` (a fresh, private modules cache for the
remote code, the hub offline); its library warnings are collected into the record
(`isolation.collected_warnings()`).
"""

from __future__ import annotations

import hashlib
import re
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from opensci_patch._util.defaults import (
    ATTENTION,
    DEFAULT_PROMPT,
    DEFAULT_TARGET,
    DTYPES,
    MAX_NEW_TOKENS,
    OLDEST_SUPPORTED,
)
from opensci_patch._util.errors import CaptureError, ModelDirError
from opensci_patch._util.model_dir import read_config
from opensci_patch.measure import provenance
from opensci_patch.measure.input_checks import check_prompt_length, check_sizes, check_token_ids, validate_model_dir
from opensci_patch.measure.isolation import collected_warnings
from opensci_patch.measure.kv_check import check_decode_steps
from opensci_patch.measure.records import (
    ErrorInfo,
    Fp64Reference,
    Generation,
    Record,
    Status,
    Target,
    TopToken,
    error_info,
    one_line,
)

# The fp64 reference needs ~8 bytes per parameter on the CPU: skip it above this size.
REFERENCE_MAX_WEIGHT_BYTES = 1 << 30
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")  # what this tool runs and checks; torch knows more (mps, xpu...)


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


def weights_bytes(model: Path) -> int:
    """The size of a model dir's safetensors weights (what decides `--reference auto`)."""
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
    try:
        return hashlib.sha256(t.view(as_int).numpy().tobytes()).hexdigest()
    except RuntimeError:  # "Numpy is not available": a torch built for numpy 1 under numpy 2 (2.0.0); the same bytes
        return hashlib.sha256(bytes(t.view(as_int).view(torch.uint8).tolist())).hexdigest()


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
    """Run one capture with the installed torch/transformers. Call inside `isolation.isolated_hf_cache()`.

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
        raise CaptureError(f"device {settings.device!r} is not a device this tool runs; use cpu or cuda[:N]")
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


def _check_input(settings: CaptureSettings, model: Path) -> None:
    """Every refusal that comes before the tokenizer: settings, model directory, memory, device, release."""
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
    if settings.device.startswith("cuda:") and int(settings.device[5:]) >= torch.cuda.device_count():
        raise CaptureError(
            f"device {settings.device!r} asked for, but this torch sees {torch.cuda.device_count()} GPU(s)"
        )
    check_release()


def _prompt_ids(tokenizer, settings: CaptureSettings, model: Path):
    """The prompt's token ids (a 1 x n tensor), refused when empty or too long for the model."""
    input_ids = tokenizer(settings.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if input_ids.shape[1] == 0:
        raise CaptureError(f"the prompt {settings.prompt!r} encodes to no tokens; pass --prompt with some text")
    check_prompt_length(model, input_ids.shape[1])
    check_token_ids(model, input_ids[0].tolist(), "the prompt")
    return input_ids


def _load(model: Path, settings: CaptureSettings, record: Record):
    """The loaded model, or None with the load failure recorded (its status and error)."""
    try:
        return load_model(model, settings.dtype, settings.attn, settings.device)
    except WeightsMismatch as exc:
        record.status, record.error = Status.WEIGHTS_MISMATCH, error_info(exc)
        return None
    except Exception as exc:  # noqa: BLE001 - the model code failing to load is a result, not a crash
        record.status, record.error = Status.LOAD_ERROR, error_info(exc)
        from opensci_patch.measure.library_modules import explain, missing_module

        module = missing_module(exc)
        if module:  # the release lacks a library module the model uses: say which, not a traceback's last line
            record.error = replace(
                record.error, type="MissingLibraryModule", message=explain(module, record.environment["transformers"])
            )
        return None


def _warn_past_positions(lm, prompt_tokens: int, settings: CaptureSettings, log) -> None:
    """Warn (into the record) when generation would run past the positions the model was trained on."""
    limit = getattr(lm.config, "max_position_embeddings", None)
    if isinstance(limit, int) and prompt_tokens + settings.max_new_tokens > limit:
        message = (
            f"prompt ({prompt_tokens} tokens) + --max-new-tokens {settings.max_new_tokens} exceeds the model's "
            f"max_position_embeddings ({limit}): positions past it were never trained"
        )
        log(f"warning: {message}")
        warnings.warn(message, stacklevel=1)


def _record_logits(record: Record, logits, tokenizer, target: str, target_id: int, top_k: int):
    """Record the last-position logits (sha256, target, top-k); returns them as fp32 on the CPU.

    Non-finite logits make the record `nonfinite-logits`."""
    import torch

    record.logits_sha256 = logits_sha256(logits)
    f32 = logits.float().cpu()
    rank = target_rank(f32, target_id)
    record.target = Target(target, target_id, float(f32[target_id]), rank)
    top = torch.topk(f32, min(top_k, f32.numel()))
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
    return f32


def _record_reference(record: Record, model: Path, lm, input_ids, f32, target_id: int) -> None:
    """The fp64 reference forward's gap to these logits, and its logit of the target."""
    from opensci_patch.measure import reference

    why = reference.not_modelled(model, lm.config)
    if why is not None:  # another architecture: no gap to report, and the model's own result stands
        record.reference = Fp64Reference("float64", None, None, f"not applicable: {why}")
        return
    cfg = reference.resolved_config(model, lm.config)
    ref = reference.forward(reference.load_params(model), cfg, input_ids.cpu())[0, -1]
    record.reference = Fp64Reference("float64", float((f32.double() - ref).abs().max()), float(ref[target_id]))


def _unsupported_record(settings: CaptureSettings, model: Path, why: str) -> Record:
    """The record of a (transformers, torch) pair outside transformers' own torch requirement: nothing ran."""
    import platform

    import torch
    import transformers

    from opensci_patch.measure.torch_support import torch_requirement

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    env.update(platform=platform.platform(), machine=platform.machine(), torch_requirement=torch_requirement())
    return Record(
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        environment=env,
        model=provenance.model_info(model),
        status=Status.UNSUPPORTED_PAIR,
        error=ErrorInfo("UnsupportedPair", why, ""),
    )


def _capture(settings: CaptureSettings, log) -> Record:
    """`capture`'s steps in order: input checks, record, tokenizer, load, forward, reference, generation.

    The first failure of the model code ends the record there, with its status and error."""
    model = Path(settings.model)
    _check_input(settings, model)

    import torch

    from opensci_patch.measure import compat
    from opensci_patch.measure.torch_support import unsupported_attention, unsupported_pair

    why = unsupported_pair() or unsupported_attention(settings.attn)
    if why is not None:  # before anything imports from transformers: it disabled torch, its classes would raise
        return _unsupported_record(settings, model, why)

    record = Record(
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        environment=provenance.environment(settings.device),
        model=provenance.model_info(model),
    )
    record.environment["shim_installed"] = compat.install_transformers_kwargs_shim() if settings.shim else False

    tokenizer = load_tokenizer(model)
    target_id = target_token_id(tokenizer, settings.target)
    check_token_ids(model, [target_id], f"the target {settings.target!r}")
    input_ids = _prompt_ids(tokenizer, settings, model)
    record.input_ids = input_ids[0].tolist()

    t0 = time.perf_counter()
    log(f"loading {model} ({settings.dtype}, {settings.attn}, {settings.device})")
    lm = _load(model, settings, record)
    if lm is None:
        return record
    record.timings["load_s"] = round(time.perf_counter() - t0, 3)
    record.environment["kernels"]["used"] = bool(getattr(lm, "use_kernels", False))
    _warn_past_positions(lm, input_ids.shape[1], settings, log)

    input_ids = input_ids.to(settings.device)
    try:
        with torch.no_grad():
            logits = lm(input_ids=input_ids).logits[0, -1]
    except Exception as exc:  # noqa: BLE001
        record.status, record.error = Status.FORWARD_ERROR, error_info(exc)
        return record
    record.timings["forward_s"] = round(time.perf_counter() - t0 - record.timings["load_s"], 3)
    f32 = _record_logits(record, logits, tokenizer, settings.target, target_id, settings.top_k)
    if record.status == Status.NONFINITE_LOGITS:
        return record

    if settings.reference == "on" or (
        settings.reference == "auto" and weights_bytes(model) <= REFERENCE_MAX_WEIGHT_BYTES
    ):
        _record_reference(record, model, lm, input_ids, f32, target_id)

    t1 = time.perf_counter()
    try:
        record.generation = generate(lm, tokenizer, input_ids, settings)
    except Exception as exc:  # noqa: BLE001
        record.status, record.error = Status.GENERATE_ERROR, error_info(exc)
        return record
    record.timings["generate_s"] = round(time.perf_counter() - t1, 3)
    kv = record.generation.kv_check
    if not kv.ok:
        record.status = Status.GENERATE_MISMATCH
        record.error = ErrorInfo("KVCacheMismatch", kv.detail, "")
    return record


def generate(lm, tokenizer, input_ids, settings: CaptureSettings) -> Generation:
    """Greedy decoding with the KV cache, checked step by step against the same steps without one (`kv_check`).

    Also returns a sha256 per step, which the report compares with the reference cell's.
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
    return Generation(
        ids=tuple(new),
        text=tokenizer.decode(new, skip_special_tokens=True),
        step_logits_sha256=tuple(logits_sha256(step) for step in steps),
        kv_check=check_decode_steps(lm, tokenizer, sequence, prompt_len, steps, settings.dtype),
    )
