"""Inside an env: load the model with the installed transformers, record one forward stage by stage and the decode loop.

Runs in a child process of the driver (a `ProbeStep` of `python -m opensci_patch.diagnose.worker`), so it may
import torch and transformers. What it writes to its output dir:

- `index.json` and one tensor file per stage (and layer) of one forward on the prompt;
- `buffers.json` (every buffer as the forward saw it, and the rotary module's `inv_freq`);
- `model_info.json` (versions, config, lm_head tie, loaded weights vs the checkpoint, status);
- with `decode_steps` > 0, the decode loop (`decode.record_decode`).

Design choices, and why:
- Hooks are registered after `from_pretrained` returns: 5.x re-creates non-persistent buffers
  while loading, so anything read earlier is not what the forward uses.
- Stage names and tensor layouts are those of `reference.forward`'s hook, so A, B and the
  fp64 reference line up without any per-side translation in `compare`.
- A model that fails to load or run is a result (status in the model info), not an exception.
"""

from __future__ import annotations

import platform
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from opensci_patch._util.defaults import ATTENTION, DEFAULT_PROMPT, DTYPES
from opensci_patch._util.errors import OpensciPatchError
from opensci_patch.diagnose import fp64
from opensci_patch.diagnose.decode import DEFAULT_DECODE_STEPS, record_decode
from opensci_patch.diagnose.stages import BUFFERS, MODEL_INFO, SCHEMA, StageWriter, fresh_dir, write_json
from opensci_patch.measure.input_checks import validate_model_dir
from opensci_patch.measure.records import error_info

Log = Callable[[str], object]
SMALL = 1024  # buffers with at most this many elements are stored by value in buffers.json


def probe(
    model_dir: Path,
    out: Path,
    *,
    dtype: str = "float32",
    attn: str = "eager",
    device: str = "cpu",
    prompt: str = DEFAULT_PROMPT,
    decode_steps: int = DEFAULT_DECODE_STEPS,
    log: Log = print,
) -> dict:
    """Load `model_dir`, run one forward on `prompt` recording every stage, then the decode loop; return the info.

    Writes the files listed in the module docstring to `out` (a fresh dir). A model that fails
    to load or run is a result (status "load-error"/"forward-error" in the info).
    """
    from opensci_patch.measure.isolation import collected_warnings, isolated_hf_cache

    if dtype not in DTYPES:
        raise OpensciPatchError(f"dtype {dtype!r} not one of {', '.join(DTYPES)}")
    if attn not in ATTENTION:
        raise OpensciPatchError(f"attention {attn!r} not one of {', '.join(ATTENTION)}")
    if decode_steps < 0:
        raise OpensciPatchError(f"decode steps must be 0 (off) or more, not {decode_steps}")
    validate_model_dir(model_dir)
    out = fresh_dir(out)
    with collected_warnings() as seen, isolated_hf_cache():
        info = _probe(model_dir, out, dtype, attn, device, prompt, decode_steps, log)
    info["warnings"] = seen
    info["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    write_json(out / MODEL_INFO, info)
    return info


def _probe(
    model_dir: Path, out: Path, dtype: str, attn: str, device: str, prompt: str, decode_steps: int, log: Log
) -> dict:
    import transformers

    from opensci_patch.measure.capture import load_model, load_tokenizer

    info: dict[str, Any] = {
        "schema": SCHEMA,
        "status": "ok",
        "model_dir": str(model_dir),
        "prompt": prompt,
        "settings": {"dtype": dtype, "attn": attn, "device": device},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "notes": [],
        "timings": {},
    }
    shutil.copyfile(model_dir / "config.json", out / "config.json")  # what `compare` recomputes inv_freq from
    tokenizer = load_tokenizer(model_dir)
    input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    info["input_ids"] = input_ids[0].tolist()

    t0 = time.perf_counter()
    log(f"loading {model_dir} ({dtype}, {attn}, {device}) with transformers {transformers.__version__}")
    try:
        lm = load_model(model_dir, dtype, attn, device)
    except Exception as exc:  # noqa: BLE001 - the model code failing to load is a finding
        info["status"], info["error"] = "load-error", error_info(exc).to_dict()
        return info
    info["timings"]["load_s"] = round(time.perf_counter() - t0, 3)
    info["settings"]["attn_implementation"] = getattr(lm.config, "_attn_implementation", None)
    info["config"] = config_info(lm.config)
    info["lm_head"] = lm_head_info(lm)
    info["weights_check"] = weights_check(lm, model_dir)

    # Hooks only now: loading is over, the buffers hold what the forward will use.
    writer = StageWriter(out)
    rotary: dict[str, Any] = {}
    buffers: dict[str, Any] = {}
    handles, restore = attach_stage_hooks(lm, writer, rotary, buffers, info["notes"], input_ids.shape[1])
    t1 = time.perf_counter()
    try:
        with torch.no_grad():
            lm(input_ids=input_ids.to(device), use_cache=False)
    except Exception as exc:  # noqa: BLE001
        info["status"], info["error"] = "forward-error", error_info(exc).to_dict()
    finally:
        for h in handles:
            h.remove()
        restore()
    info["timings"]["forward_s"] = round(time.perf_counter() - t1, 3)
    writer.write_index(
        {
            "source": "probe",
            "input_ids": info["input_ids"],
            "num_layers": info["config"].get("num_hidden_layers"),
            "dtype": dtype,
        }
    )
    write_json(out / BUFFERS, {"buffers": buffers.get("list", []), "rotary": rotary})
    if info["status"] == "ok" and decode_steps:
        t2 = time.perf_counter()
        decode = record_decode(lm, tokenizer, input_ids.to(device), decode_steps, out)
        info["decode"] = {"status": decode["status"], "steps": decode["steps"]}
        info["timings"]["decode_s"] = round(time.perf_counter() - t2, 3)
    return info


def config_info(cfg: Any) -> dict:
    """The config fields the checks read, with rope_theta / partial_rotary_factor wherever the release keeps them."""
    rope_params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    theta = getattr(cfg, "rope_theta", None)
    if theta is None and isinstance(rope_params, dict):
        theta = rope_params.get("rope_theta")
    partial = getattr(cfg, "partial_rotary_factor", None)
    if partial is None and isinstance(rope_params, dict):
        partial = rope_params.get("partial_rotary_factor")
    keys = (
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "num_hidden_layers",
        "head_dim",
        "tie_word_embeddings",
        "vocab_size",
    )
    info = {k: getattr(cfg, k, None) for k in keys}
    if info["head_dim"] is None and info["hidden_size"] and info["num_attention_heads"]:
        info["head_dim"] = info["hidden_size"] // info["num_attention_heads"]
    return info | {
        "rope_theta": theta,
        "partial_rotary_factor": 1.0 if partial is None else partial,
        "rope_parameters": rope_params if isinstance(rope_params, dict) else str(rope_params),
    }


def lm_head_info(lm: Any) -> dict:
    """Whether lm_head is embed_tokens (same storage, or equal values), for the tie check."""
    try:
        head, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    except Exception as exc:  # noqa: BLE001
        return {"error": error_info(exc).message}
    if head is None or emb is None or not hasattr(head, "weight"):
        return {"present": False}
    head_weight, emb_weight = head.weight, emb.weight
    same = head_weight.data_ptr() == emb_weight.data_ptr() and head_weight.shape == emb_weight.shape
    out: dict[str, Any] = {"present": True, "same_storage": bool(same)}
    if head_weight.shape == emb_weight.shape:
        out["equal_values"] = bool(same) or bool(torch.equal(head_weight, emb_weight))
        # one temporary of the head's size, in its own dtype, and only when they differ
        out["max_abs_diff"] = (
            0.0 if out["equal_values"] else float((head_weight.detach() - emb_weight.detach()).abs().max())
        )
    else:
        out["equal_values"] = False
    return out


def weights_check(lm: Any, model_dir: Path) -> dict:
    """Each checkpoint tensor against the loaded parameter of the same name, one tensor at a time.

    Finds weights that loading replaced (5.0/5.1 re-ran `_init_weights` and wiped them) without
    ever holding a second copy of the model.
    """
    from safetensors import safe_open

    state = dict(lm.named_parameters(remove_duplicate=False)) | dict(lm.named_buffers(remove_duplicate=False))
    differ: list[dict] = []
    missing: list[str] = []
    checked = 0
    for f in fp64.weight_files(model_dir):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                p = state.get(key)
                if p is None or p.is_meta:
                    missing.append(key)
                    continue
                t = fh.get_tensor(key).to(p.dtype)
                checked += 1
                if t.shape != p.shape:
                    differ.append({"name": key, "why": f"shape {list(p.shape)} loaded, {list(t.shape)} stored"})
                elif not bool((p.detach().to("cpu") == t).all()):
                    diff = float((p.detach().to("cpu").double() - t.double()).abs().max())
                    differ.append({"name": key, "max_abs_diff": diff})
    return {
        "checked": checked,
        "differ": differ[:50],
        "n_differ": len(differ),
        "not_matched": missing[:50],
        "n_not_matched": len(missing),
    }


def tensor_summary(t: Any, with_values: bool = True) -> dict:
    """dtype, shape, finiteness and absmax of a buffer; its values too when it is small (inv_freq is)."""
    out: dict[str, Any] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "numel": t.numel()}
    if t.is_meta:
        return out | {"meta": True}
    if t.is_floating_point() or t.is_complex():
        f = t.detach().to("cpu", torch.float64)
        out["all_zero"] = bool(t.numel() > 0 and not bool(f.ne(0).any()))
        out["finite"] = bool(torch.isfinite(f).all())
        if t.numel():
            finite = f[torch.isfinite(f)]
            out["absmax"] = float(finite.abs().max()) if finite.numel() else None
    if with_values and t.numel() <= SMALL:
        values = t.detach().to("cpu")
        out["values"] = values.double().flatten().tolist() if t.is_floating_point() else values.flatten().tolist()
    return out


def _find(root: Any, path: str) -> Any:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, (tuple, list)) else x


# (module path inside a decoder layer, stage, whether q/k heads must be moved first)
LAYER_MODULES = (
    ("input_layernorm", "input_norm", False),
    ("self_attn.q_proj", "q_proj", False),
    ("self_attn.k_proj", "k_proj", False),
    ("self_attn.v_proj", "v_proj", False),
    ("self_attn.q_norm", "q_norm", True),
    ("self_attn.k_norm", "k_norm", True),
    ("self_attn.o_proj", "attn_out", False),
    ("mlp", "mlp_out", False),
)


def attach_stage_hooks(
    lm: Any, writer: StageWriter, rotary: dict, buffers: dict, notes: list[str], seq_len: int
) -> tuple[list[Any], Callable[[], None]]:
    """Register the recording hooks and wrap `apply_rotary_pos_emb`; return (handles, restore).

    Each stage goes to `writer`; the buffers as the forward sees them to `buffers["list"]`, the
    rotary module's `inv_freq` to `rotary`; a stage that cannot be recorded is a line in `notes`.
    """
    handles: list[Any] = []
    state: dict[str, Any] = {"layer": None}  # the decoder layer running now, for q_rope/k_rope
    base = getattr(lm, getattr(lm, "base_model_prefix", "model"), None) or _find(lm, "model")
    cfg = lm.config
    heads_first = _heads_first(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads, seq_len)
    handles.append(lm.register_forward_pre_hook(_buffer_snapshot(lm, buffers)))

    def add(path: str, hook: Callable, stage: str) -> None:
        module = _find(base, path) if base is not None else None
        if module is None:
            notes.append(f"no module {path!r}: stage {stage} not recorded")
            return
        handles.append(module.register_forward_hook(hook))

    add("embed_tokens", _output_hook(writer, "embed", None), "embed")
    _hook_rotary(_find(base, "rotary_emb") if base is not None else None, writer, rotary, notes, handles)
    _hook_layers(_find(base, "layers") if base is not None else None, heads_first, writer, state, notes, handles)
    add("norm", _output_hook(writer, "final_norm", None), "final_norm")
    head = lm.get_output_embeddings()
    if head is not None:
        handles.append(head.register_forward_hook(_output_hook(writer, "logits", None)))
    else:
        notes.append("no output embeddings: logits not recorded")
    return handles, _wrap_apply_rotary(lm, writer, state, notes)


def _identity(t: Any) -> Any:
    return t


def _heads_first(head_dim: int, seq_len: int) -> Callable[[Any], Any]:
    """q/k after their norm, as the reference lays them out: (batch, heads, seq, head_dim)."""

    def convert(t: Any) -> Any:
        if t.dim() == 3:  # norm over the flat projection (batch, seq, heads * head_dim)
            return t.view(t.shape[0], t.shape[1], -1, head_dim).transpose(1, 2)
        if t.dim() == 4 and t.shape[1] == seq_len:  # (batch, seq, heads, head_dim): norm before transpose
            return t.transpose(1, 2)
        return t

    return convert


def _output_hook(writer: StageWriter, stage: str, layer: int | None, convert: Callable[[Any], Any] = _identity):
    """A forward hook that saves the module's (first) output as `stage` of `layer`."""

    def hook(_module: Any, _args: Any, output: Any) -> None:
        writer.save(stage, layer, convert(_first(output)))

    return hook


def _buffer_snapshot(lm: Any, buffers: dict) -> Callable[[Any, Any], None]:
    """A forward pre-hook that records every buffer of `lm` (and whether it is persistent) once, in `buffers`."""

    def snapshot(_module: Any, _args: Any) -> None:
        if "list" in buffers:
            return
        entries = []
        for name, buf in lm.named_buffers():
            owner_name, _, short = name.rpartition(".")
            owner = lm.get_submodule(owner_name) if owner_name else lm
            persistent = short not in getattr(owner, "_non_persistent_buffers_set", set())
            entries.append({"name": name, "persistent": persistent, **tensor_summary(buf)})
        buffers["list"] = entries

    return snapshot


def _hook_rotary(module: Any, writer: StageWriter, rotary: dict, notes: list[str], handles: list[Any]) -> None:
    """Record the rotary module's `inv_freq` before and after its first call, and the cos/sin tables it returns."""
    if module is None:
        notes.append("no module 'rotary_emb': rope.cos/rope.sin and inv_freq not recorded")
        return
    rotary["module_class"] = type(module).__name__

    def rotary_before(module: Any, _args: Any) -> None:
        if "at_call" not in rotary and isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            rotary["at_call"] = tensor_summary(module.inv_freq)

    def rotary_after(module: Any, _args: Any, output: Any) -> None:
        if "after_call" in rotary:
            return
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            rotary["after_call"] = tensor_summary(module.inv_freq)
        cos, sin = output[0], output[1]
        writer.save("rope.cos", None, cos[0] if cos.dim() == 3 else cos)
        writer.save("rope.sin", None, sin[0] if sin.dim() == 3 else sin)

    handles.append(module.register_forward_pre_hook(rotary_before))
    handles.append(module.register_forward_hook(rotary_after))


def _hook_layers(layers: Any, heads_first: Callable[[Any], Any], writer: StageWriter, state: dict, notes: list[str],
                 handles: list[Any]) -> None:  # fmt: skip
    """Per decoder layer: its residual output, each `LAYER_MODULES` stage, and which layer runs (`state`)."""
    for i, layer in enumerate(layers or []):

        def enter(_m: Any, _a: Any, i: int = i) -> None:
            state["layer"] = i

        handles.append(layer.register_forward_pre_hook(enter))
        handles.append(layer.register_forward_hook(_output_hook(writer, "residual", i)))
        for path, stage, move_heads in LAYER_MODULES:
            module = _find(layer, path)
            if module is None:
                notes.append(f"layer {i}: no module {path!r}: stage {stage} not recorded")
                continue
            convert = heads_first if move_heads else _identity
            handles.append(module.register_forward_hook(_output_hook(writer, stage, i, convert)))
    if layers is None:
        notes.append("no 'layers' module list: per-layer stages not recorded")


def _wrap_apply_rotary(lm: Any, writer: StageWriter, state: dict, notes: list[str]) -> Callable[[], None]:
    """q/k after RoPE are no module's output: wrap the modeling module's apply_rotary_pos_emb. Returns the undo."""
    modeling = sys.modules.get(type(lm).__module__)
    original = getattr(modeling, "apply_rotary_pos_emb", None)
    if modeling is None or not callable(original):
        notes.append("the modeling module has no apply_rotary_pos_emb: q_rope/k_rope not recorded")
        return lambda: None

    def recording(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if isinstance(result, tuple) and len(result) == 2 and state["layer"] is not None:
            writer.save("q_rope", state["layer"], result[0])
            writer.save("k_rope", state["layer"], result[1])
        return result

    modeling.apply_rotary_pos_emb = recording

    def restore() -> None:
        modeling.apply_rotary_pos_emb = original

    return restore
