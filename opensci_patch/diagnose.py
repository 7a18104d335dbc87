"""When two cells disagree: name the first diverging stage of the forward pass and its likely cause.

`opensci-patch diagnose A B` runs one forward pass of the same checkpoint on both cells (each in its own
per-release env, prepared per model variant with `hotfix`), records every stage of it, runs the
independent fp64 forward of `opensci_patch.reference` on the same tokens, and compares stage by
stage in forward order. The capture records of `report` say *that* two cells differ; this says
*where* (stage, layer, position 0 or later) and *why* (named checks with evidence).

Three entry points run inside an env, in child processes (the driver needs neither torch nor
transformers, so this module imports only the standard library at the top):

    python -m opensci_patch.diagnose probe MODEL_DIR --out DIR [--dtype D] [--attn A] [--prompt P]
    python -m opensci_patch.diagnose reference MODEL_DIR --out DIR --ids 1,2,3
    python -m opensci_patch.diagnose compare DIR_A DIR_B [--ref DIR_REF] --out compare.json

and one that drives them (what the CLI's `diagnose` calls): `diagnose(a, b, model_dir, out_dir)`.

Design choices, and why:
- Hooks are registered after `from_pretrained` returns: 5.x re-creates non-persistent buffers
  while loading, so anything read earlier is not what the forward uses.
- Every stage is written to disk (one `torch.save` file per stage and layer) the moment it is
  produced and no reference is kept, so a probe's peak memory is the weights plus the
  activations the model itself holds for one layer; `compare` loads one stage at a time.
- Stage names and tensor layouts are those of `reference.forward`'s hook, so A, B and the
  fp64 reference line up without any per-side translation in `compare`.
- RoPE is the identity at position 0, so every difference is split into position 0 and
  positions > 0: a RoPE bug shows only at > 0.
- "Earlier stages agree" makes the first divergence in forward order the stage with its own
  error (the fx minimizer's question) without re-feeding inputs; the RoPE pairing check does
  re-feed: it applies the reference rotation to the side's *own* q_norm and cos/sin.
- Buffers are compared with values recomputed from the config, never with zero: the memory
  5.x leaves in `inv_freq` is often non-zero garbage.

Thresholds (`TOLERANCE`): a stage diverges when max |A - B| > tol * (1 + max |ref|), the looser
dtype of the two sides setting tol; a side leaves the fp64 reference when max |X - ref| > tol of
its own dtype * (1 + max |ref|). The scale makes the test relative for large activations
(logits) and absolute near zero. tol is 1e-4 for float32: a correct fp32 eager forward of the
fixture stays within 4e-7 * (1 + max|ref|) of fp64 at every stage (TransformerLens uses 5e-5
absolute for fp32 eager), while the bugs this looks for are O(1). 5e-2 for bfloat16: measured,
a correct bf16 forward of the fixture reaches 1.6e-2 * (1 + max|ref|) (k_norm of layer 1; bf16
eps is 7.8e-3 and RMSNorm amplifies), so 1e-2 would call rounding a bug. 1e-2 for float16
(eps 9.8e-4, 8x finer than bf16). The fp64 noise test then separates rounding from bugs: a side
is wrong when it is beyond its own dtype's tolerance from fp64, and a bug is typically orders of
magnitude (`BUG_RATIO`) further from fp64 than the other side.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .capture import ATTENTION, DEFAULT_PROMPT, DTYPES, REFERENCE_MAX_WEIGHT_BYTES, validate_model_dir
from .errors import DestinationError, OpensciPatchError
from .matrix import DEFAULT_TORCH_BUILD, MODELS, OWN_CHECKPOINT, TORCH_BUILDS, Cell

Log = Callable[[str], object]

SCHEMA = 1
INDEX = "index.json"
BUFFERS = "buffers.json"
MODEL_INFO = "model_info.json"
RESULT = "diagnose.json"
MARKER = ".opensci-diagnose"  # in every directory diagnose creates: only those are ever replaced
FIXTURE_DIR = Path(__file__).parent / "data" / "opensci-tiny"
SMALL = 1024  # buffers with at most this many elements are stored by value in buffers.json

GLOBAL_PRE = ("embed", "rope.cos", "rope.sin")
LAYER_STAGES = (
    "input_norm",
    "q_proj",
    "k_proj",
    "v_proj",
    "q_norm",
    "k_norm",
    "q_rope",
    "k_rope",
    "attn_out",
    "mlp_out",
    "residual",
)
GLOBAL_POST = ("final_norm", "logits")
# The axis that indexes sequence positions, in the reference's layouts.
SEQ_AXIS = {"rope.cos": 0, "rope.sin": 0, "q_norm": 2, "k_norm": 2, "q_rope": 2, "k_rope": 2}
TOLERANCE = {"float64": 1e-4, "float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
BUG_RATIO = 100.0  # one side this many times further from fp64 than the other: a bug, not rounding
# Which checks can explain a first divergence at which stage (None: any stage).
EXPLAINS: dict[str, set[str] | None] = {
    "input_ids": None,
    "weights_match_checkpoint": None,
    "buffers_finite": None,
    "inv_freq_values": {"rope.cos", "rope.sin", "q_rope", "k_rope"},
    "inv_freq_dtype": {"rope.cos", "rope.sin", "q_rope", "k_rope"},
    "rope_dims": {"rope.cos", "rope.sin", "q_rope", "k_rope"},
    "rope_pairing": {"q_rope", "k_rope"},
    "lm_head_tied": {"logits"},
    "attention_kernel": {"attn_out"},
}


def seq_axis(stage: str) -> int:
    return SEQ_AXIS.get(stage, 1)


def stage_key(stage: str, layer: int | None) -> str:
    return stage if layer is None else f"layer {layer} {stage}"


def stage_order(num_layers: int) -> list[tuple[str, int | None]]:
    """Forward order of the stages: embedding, RoPE tables, each layer's stages, final norm, logits."""
    order: list[tuple[str, int | None]] = [(s, None) for s in GLOBAL_PRE]
    order += [(s, i) for i in range(num_layers) for s in LAYER_STAGES]
    return order + [(s, None) for s in GLOBAL_POST]


def threshold(dtype_a: str, dtype_b: str, ref_max: float) -> float:
    tol = max(TOLERANCE.get(dtype_a, 1e-2), TOLERANCE.get(dtype_b, 1e-2))
    return tol * (1.0 + ref_max)


# ---------------------------------------------------------------------------------------------
# output directories


def _fresh_dir(path: Path) -> Path:
    """An empty directory marked as ours; an existing one is replaced only if we made it."""
    if path.exists():
        if path.is_dir() and (path / MARKER).exists():
            shutil.rmtree(path)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        else:
            raise DestinationError(f"{path} exists and was not made by diagnose; choose another --out")
    path.mkdir(parents=True)
    (path / MARKER).write_text("created by opensci_patch.diagnose; safe to delete\n")
    return path


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def _error(exc: BaseException) -> dict:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    text = str(exc).strip()
    return {"type": type(exc).__name__, "message": text.splitlines()[0] if text else "", "traceback_tail": tb[-3000:]}


# ---------------------------------------------------------------------------------------------
# inside an env: the stage writer shared by `probe` and `reference`


class StageWriter:
    """Writes each stage tensor to its own file as it is produced and keeps only the index."""

    def __init__(self, out: Path):
        self.out = out
        self.entries: list[dict] = []
        self.seen: set[tuple[str, int | None]] = set()

    def save(self, stage: str, layer: int | None, tensor: Any) -> None:
        import torch

        if (stage, layer) in self.seen:  # a module called twice: the first call is the forward's own
            return
        self.seen.add((stage, layer))
        # clone: torch.save of a view would write its whole storage; contiguous for the same reason
        t = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        name = f"{stage}.pt" if layer is None else f"L{layer:03d}.{stage}.pt"
        torch.save(t, self.out / name)
        self.entries.append(
            {
                "stage": stage,
                "layer": layer,
                "file": name,
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
                "seq_axis": seq_axis(stage),
            }
        )

    def write_index(self, extra: dict) -> None:
        _write_json(self.out / INDEX, {"schema": SCHEMA, **extra, "stages": self.entries})


def _tensor_summary(t: Any, with_values: bool = True) -> dict:
    import torch

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
        out["values"] = (
            t.detach().to("cpu").double().flatten().tolist()
            if t.is_floating_point()
            else (t.detach().to("cpu").flatten().tolist())
        )
    return out


# ---------------------------------------------------------------------------------------------
# inside an env: probe


def probe(
    model_dir: Path,
    out: Path,
    *,
    dtype: str = "float32",
    attn: str = "eager",
    device: str = "cpu",
    prompt: str = DEFAULT_PROMPT,
    log: Log = print,
) -> dict:
    """Load `model_dir` with the installed transformers, run one forward on `prompt`, record every stage.

    Writes `out/index.json`, one tensor file per stage (and layer), `buffers.json` and
    `model_info.json`; returns the model info. A model that fails to load or run is a result
    (status "load-error"/"forward-error" in the info), not an exception.
    """
    from .capture import collected_warnings, isolated_hf_cache

    if dtype not in DTYPES:
        raise OpensciPatchError(f"dtype {dtype!r} not one of {', '.join(DTYPES)}")
    if attn not in ATTENTION:
        raise OpensciPatchError(f"attention {attn!r} not one of {', '.join(ATTENTION)}")
    validate_model_dir(model_dir)
    out = _fresh_dir(out)
    with collected_warnings() as seen, isolated_hf_cache():
        info = _probe(model_dir, out, dtype, attn, device, prompt, log)
    info["warnings"] = seen
    info["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    _write_json(out / MODEL_INFO, info)
    return info


def _probe(model_dir: Path, out: Path, dtype: str, attn: str, device: str, prompt: str, log: Log) -> dict:
    import torch
    import transformers

    from .capture import load_model, load_tokenizer

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
        info["status"], info["error"] = "load-error", _error(exc)
        return info
    info["timings"]["load_s"] = round(time.perf_counter() - t0, 3)
    info["settings"]["attn_implementation"] = getattr(lm.config, "_attn_implementation", None)
    info["config"] = _config_info(lm.config)
    info["lm_head"] = _lm_head_info(lm)
    info["weights_check"] = _weights_check(lm, model_dir)

    # Hooks only now: loading is over, the buffers hold what the forward will use.
    writer = StageWriter(out)
    rotary: dict[str, Any] = {}
    buffers: dict[str, Any] = {}
    handles, restore = _attach(lm, writer, rotary, buffers, info["notes"], input_ids.shape[1])
    t1 = time.perf_counter()
    try:
        with torch.no_grad():
            lm(input_ids=input_ids.to(device), use_cache=False)
    except Exception as exc:  # noqa: BLE001
        info["status"], info["error"] = "forward-error", _error(exc)
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
    _write_json(out / BUFFERS, {"buffers": buffers.get("list", []), "rotary": rotary})
    return info


def _config_info(cfg: Any) -> dict:
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


def _lm_head_info(lm: Any) -> dict:
    import torch

    try:
        head, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    except Exception as exc:  # noqa: BLE001
        return {"error": _error(exc)["message"]}
    if head is None or emb is None or not hasattr(head, "weight"):
        return {"present": False}
    hw, ew = head.weight, emb.weight
    same = hw.data_ptr() == ew.data_ptr() and hw.shape == ew.shape
    out: dict[str, Any] = {"present": True, "same_storage": bool(same)}
    if hw.shape == ew.shape:
        out["equal_values"] = bool(same) or bool(torch.equal(hw, ew))
        # one temporary of the head's size, in its own dtype, and only when they differ
        out["max_abs_diff"] = 0.0 if out["equal_values"] else float((hw.detach() - ew.detach()).abs().max())
    else:
        out["equal_values"] = False
    return out


def _weights_check(lm: Any, model_dir: Path) -> dict:
    """Each checkpoint tensor against the loaded parameter of the same name, one tensor at a time.

    Finds weights that loading replaced (5.0/5.1 re-ran `_init_weights` and wiped them) without
    ever holding a second copy of the model.
    """
    from safetensors import safe_open

    from .reference import weight_files

    state = dict(lm.named_parameters(remove_duplicate=False)) | dict(lm.named_buffers(remove_duplicate=False))
    differ: list[dict] = []
    missing: list[str] = []
    checked = 0
    for f in weight_files(model_dir):
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


def _find(root: Any, path: str) -> Any:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, (tuple, list)) else x


def _attach(lm: Any, w: StageWriter, rotary: dict, buffers: dict, notes: list[str], seq_len: int):
    """Register the recording hooks and wrap `apply_rotary_pos_emb`; return (handles, restore)."""
    import torch

    handles: list[Any] = []
    state: dict[str, Any] = {"layer": None}
    base = getattr(lm, getattr(lm, "base_model_prefix", "model"), None) or _find(lm, "model")
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def out_hook(stage: str, layer: int | None, convert: Callable[[Any], Any] = lambda t: t):
        def hook(_module: Any, _args: Any, output: Any) -> None:
            w.save(stage, layer, convert(_first(output)))

        return hook

    def heads_first(t: Any) -> Any:
        """q/k after their norm, as the reference lays them out: (batch, heads, seq, head_dim)."""
        if t.dim() == 3:  # norm over the flat projection (batch, seq, heads * head_dim)
            return t.view(t.shape[0], t.shape[1], -1, head_dim).transpose(1, 2)
        if t.dim() == 4 and t.shape[1] == seq_len:  # (batch, seq, heads, head_dim): norm before transpose
            return t.transpose(1, 2)
        return t

    def snapshot_buffers(_module: Any, _args: Any) -> None:
        if "list" in buffers:
            return
        entries = []
        for name, buf in lm.named_buffers():
            owner_name, _, short = name.rpartition(".")
            owner = lm.get_submodule(owner_name) if owner_name else lm
            persistent = short not in getattr(owner, "_non_persistent_buffers_set", set())
            entries.append({"name": name, "persistent": persistent, **_tensor_summary(buf)})
        buffers["list"] = entries

    handles.append(lm.register_forward_pre_hook(snapshot_buffers))

    def add(path: str, hook: Callable, stage: str) -> None:
        module = _find(base, path) if base is not None else None
        if module is None:
            notes.append(f"no module {path!r}: stage {stage} not recorded")
            return
        handles.append(module.register_forward_hook(hook))

    add("embed_tokens", out_hook("embed", None), "embed")
    rot = _find(base, "rotary_emb") if base is not None else None
    if rot is None:
        notes.append("no module 'rotary_emb': rope.cos/rope.sin and inv_freq not recorded")
    else:
        rotary["module_class"] = type(rot).__name__

        def rot_pre(module: Any, _args: Any) -> None:
            if "at_call" not in rotary and isinstance(getattr(module, "inv_freq", None), torch.Tensor):
                rotary["at_call"] = _tensor_summary(module.inv_freq)

        def rot_post(module: Any, _args: Any, output: Any) -> None:
            if "after_call" in rotary:
                return
            if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
                rotary["after_call"] = _tensor_summary(module.inv_freq)
            cos, sin = output[0], output[1]
            w.save("rope.cos", None, cos[0] if cos.dim() == 3 else cos)
            w.save("rope.sin", None, sin[0] if sin.dim() == 3 else sin)

        handles.append(rot.register_forward_pre_hook(rot_pre))
        handles.append(rot.register_forward_hook(rot_post))

    layers = _find(base, "layers") if base is not None else None
    for i, layer in enumerate(layers or []):

        def enter(_m: Any, _a: Any, i: int = i) -> None:
            state["layer"] = i

        handles.append(layer.register_forward_pre_hook(enter))
        handles.append(layer.register_forward_hook(out_hook("residual", i)))
        for path, stage, conv in (
            ("input_layernorm", "input_norm", None),
            ("self_attn.q_proj", "q_proj", None),
            ("self_attn.k_proj", "k_proj", None),
            ("self_attn.v_proj", "v_proj", None),
            ("self_attn.q_norm", "q_norm", heads_first),
            ("self_attn.k_norm", "k_norm", heads_first),
            ("self_attn.o_proj", "attn_out", None),
            ("mlp", "mlp_out", None),
        ):
            module = _find(layer, path)
            if module is None:
                notes.append(f"layer {i}: no module {path!r}: stage {stage} not recorded")
                continue
            handles.append(module.register_forward_hook(out_hook(stage, i, conv or (lambda t: t))))
    if layers is None:
        notes.append("no 'layers' module list: per-layer stages not recorded")
    add("norm", out_hook("final_norm", None), "final_norm")
    head = lm.get_output_embeddings()
    if head is not None:
        handles.append(head.register_forward_hook(out_hook("logits", None)))
    else:
        notes.append("no output embeddings: logits not recorded")

    # q/k after RoPE are no module's output: wrap the modeling module's apply_rotary_pos_emb.
    mod = sys.modules.get(type(lm).__module__)
    original = getattr(mod, "apply_rotary_pos_emb", None)
    if mod is None or not callable(original):
        notes.append("the modeling module has no apply_rotary_pos_emb: q_rope/k_rope not recorded")
        return handles, lambda: None

    def recording(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if isinstance(result, tuple) and len(result) == 2 and state["layer"] is not None:
            w.save("q_rope", state["layer"], result[0])
            w.save("k_rope", state["layer"], result[1])
        return result

    mod.apply_rotary_pos_emb = recording

    def restore() -> None:
        mod.apply_rotary_pos_emb = original

    return handles, restore


# ---------------------------------------------------------------------------------------------
# inside an env: the fp64 reference


def reference_probe(model_dir: Path, out: Path, input_ids: list[int]) -> dict:
    """Every stage of the independent fp64 forward (`opensci_patch.reference`) on `input_ids`."""
    import torch

    from . import reference

    out = _fresh_dir(out)
    cfg = reference.read_config(model_dir)
    writer = StageWriter(out)
    t0 = time.perf_counter()
    reference.forward(reference.load_params(model_dir), cfg, torch.tensor([input_ids]), hook=writer.save)
    shutil.copyfile(model_dir / "config.json", out / "config.json")
    info = {
        "source": "reference",
        "input_ids": input_ids,
        "num_layers": cfg["num_hidden_layers"],
        "dtype": "float64",
        "forward_s": round(time.perf_counter() - t0, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    writer.write_index(info)
    return info


# ---------------------------------------------------------------------------------------------
# inside an env: compare


def _index(d: Path) -> dict:
    data = json.loads((d / INDEX).read_text())
    data["by_key"] = {(e["stage"], e["layer"]): e for e in data["stages"]}
    return data


def _load(d: Path, entry: dict) -> Any:
    import torch

    return torch.load(d / entry["file"], map_location="cpu", weights_only=True).double()


def _split(diff: Any, axis: int) -> tuple[float, float, list[float]]:
    """Max of |diff| at position 0, at positions > 0, and per position (NaN propagates: it diverges)."""
    per = diff.abs().movedim(axis, 0).reshape(diff.shape[axis], -1)
    nan = per.isnan().any(dim=1)
    per_pos = per.nan_to_num(nan=0.0).amax(dim=1)
    values = [math.nan if bool(n) else float(v) for v, n in zip(per_pos, nan, strict=True)]
    rest = values[1:]
    return values[0], (math.nan if any(math.isnan(v) for v in rest) else max(rest, default=0.0)), values


def _gt(x: float, thr: float) -> bool:
    return math.isnan(x) or x > thr


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2e}"


def compare(dir_a: Path, dir_b: Path, dir_ref: Path | None = None, labels: tuple[str, str] = ("A", "B")) -> dict:
    """Stage-by-stage comparison of two probes (and the fp64 reference), plus the root-cause checks."""
    import torch

    ia, ib = _index(dir_a), _index(dir_b)
    ir = _index(dir_ref) if dir_ref is not None else None
    info = {lab: json.loads((d / MODEL_INFO).read_text()) for lab, d in zip(labels, (dir_a, dir_b), strict=True)}
    dtype_a, dtype_b = ia["dtype"], ib["dtype"]
    num_layers = max(ia.get("num_layers") or 0, ib.get("num_layers") or 0)
    rows: list[dict] = []
    missing: list[str] = []
    for stage, layer in stage_order(num_layers):
        key = stage_key(stage, layer)
        ea, eb = ia["by_key"].get((stage, layer)), ib["by_key"].get((stage, layer))
        er = ir["by_key"].get((stage, layer)) if ir else None
        if ea is None or eb is None:
            absent = [lab for lab, e in zip(labels, (ea, eb), strict=True) if e is None]
            missing.append(f"{key} (not recorded in {' and '.join(absent)})")
            continue
        ta, tb = _load(dir_a, ea), _load(dir_b, eb)
        tr = _load(dir_ref, er) if er is not None and dir_ref is not None else None
        row: dict[str, Any] = {
            "stage": stage,
            "layer": layer,
            "key": key,
            "shape_a": ea["shape"],
            "shape_b": eb["shape"],
        }
        if ta.shape != tb.shape:
            row |= {
                "diverged": True,
                "where": "shape",
                "why": f"shapes differ: {labels[0]} {list(ta.shape)}, {labels[1]} {list(tb.shape)}",
            }
            if tr is not None:
                row["ref_shape"] = list(tr.shape)
                row["closer"] = labels[0] if ta.shape == tr.shape else labels[1] if tb.shape == tr.shape else None
            rows.append(row)
            continue
        axis = seq_axis(stage)
        scale = tr if tr is not None else ta  # without a reference, A's own magnitude (finite part)
        ref_max = float(scale[torch.isfinite(scale)].abs().max()) if bool(torch.isfinite(scale).any()) else 0.0
        thr = threshold(dtype_a, dtype_b, ref_max)
        p0, rest, per = _split(ta - tb, axis)
        row |= {"ab_pos0": p0, "ab_rest": rest, "ab_per_position": per, "ref_max": ref_max, "threshold": thr}
        if tr is not None and tr.shape == ta.shape:
            a0, ar, _ = _split(ta - tr, axis)
            b0, br, _ = _split(tb - tr, axis)
            row |= {
                "threshold_a": threshold(dtype_a, dtype_a, ref_max),
                "threshold_b": threshold(dtype_b, dtype_b, ref_max),
                "a_ref_pos0": a0,
                "a_ref_rest": ar,
                "b_ref_pos0": b0,
                "b_ref_rest": br,
                "a_ref": _nanmax(a0, ar),
                "b_ref": _nanmax(b0, br),
            }
        row["diverged"] = _gt(p0, thr) or _gt(rest, thr)
        row["where"] = _where(p0, rest, thr) if row["diverged"] else None
        rows.append(row)
        del ta, tb, tr

    first = next((r for r in rows if r["diverged"]), None)
    result: dict[str, Any] = {
        "labels": list(labels),
        "dtypes": [dtype_a, dtype_b],
        "stages": rows,
        "missing_stages": missing,
        "first_divergence": first,
    }
    if first is not None:
        result["first_divergence_verdict"] = _side_verdict(first, labels)
    checks: list[dict] = [_check_input_ids(ia, ib, ir, labels)]
    for label, d, dtype in ((labels[0], dir_a, dtype_a), (labels[1], dir_b, dtype_b)):
        checks += _side_checks(label, d, info[label], dtype, torch)
    if ir is not None:
        for label, side_key in ((labels[0], "a_ref"), (labels[1], "b_ref")):
            checks.append(_check_matches_reference(label, rows, side_key))
    if first is not None:
        checks.append(_check_noise(first, labels, dtype_a, dtype_b))
    result["checks"] = checks
    return result


def _where(pos0: float, rest: float, thr: float) -> str:
    if not _gt(pos0, thr):
        return "positions > 0 only"
    return "all positions" if _gt(rest, thr) else "position 0 only"


def _ratio(x: float, y: float) -> float:
    """How many times further from fp64 the worse side is (inf when the better one is exact)."""
    if math.isnan(x) or math.isnan(y):
        return math.inf
    lo, hi = min(x, y), max(x, y)
    return hi / lo if lo > 0 else (math.inf if hi > 0 else 1.0)


def _nanmax(*xs: float) -> float:
    return math.nan if any(math.isnan(x) for x in xs) else max(xs)


def _side_verdict(row: dict, labels: tuple[str, str]) -> dict:
    """Which side the fp64 reference blames at this stage, and how confidently."""
    a_lab, b_lab = labels
    if row.get("where") == "shape":
        closer = row.get("closer")
        if closer is None:
            return {"wrong": None, "text": row["why"]}
        wrong = b_lab if closer == a_lab else a_lab
        return {"wrong": wrong, "text": f"{row['why']}; {closer} has the reference's shape {row['ref_shape']}"}
    if "a_ref" not in row:
        return {"wrong": None, "text": "no fp64 reference: cannot tell which side is wrong"}
    a, b = row["a_ref"], row["b_ref"]
    bad_a, bad_b = _gt(a, row["threshold_a"]), _gt(b, row["threshold_b"])
    if not bad_a and not bad_b:
        return {
            "wrong": None,
            "text": f"both within their dtype's rounding of the fp64 reference ({a_lab} {_fmt(a)} <= "
            f"{row['threshold_a']:.1e}, {b_lab} {_fmt(b)} <= {row['threshold_b']:.1e}): rounding noise",
        }
    ratio = _ratio(a, b)
    if bad_a and bad_b and ratio < BUG_RATIO:
        return {
            "wrong": "both",
            "text": f"both sides differ from the fp64 reference ({a_lab} {_fmt(a)}, {b_lab} {_fmt(b)})",
        }
    if bad_a != bad_b:  # only one side beyond its own dtype's rounding
        wrong, right = (a_lab, b_lab) if bad_a else (b_lab, a_lab)
    else:  # both beyond, one orders of magnitude further: that one
        wrong, right = (a_lab, b_lab) if (math.isnan(a) or (not math.isnan(b) and a > b)) else (b_lab, a_lab)
    w_err, r_err = (a, b) if wrong == a_lab else (b, a)
    return {"wrong": wrong, "text": f"{wrong} is wrong: {_fmt(w_err)} from reference, {right} {_fmt(r_err)}"}


def _check(name: str, side: str | None, fired: bool, evidence: str, **extra: Any) -> dict:
    return {"name": name, "side": side, "fired": fired, "evidence": evidence, **extra}


def _check_input_ids(ia: dict, ib: dict, ir: dict | None, labels: tuple[str, str]) -> dict:
    same = ia["input_ids"] == ib["input_ids"]
    ev = (
        f"both tokenize the prompt to {len(ia['input_ids'])} tokens {ia['input_ids']}"
        if same
        else f"the tokenizers disagree: {labels[0]} {ia['input_ids']}, {labels[1]} {ib['input_ids']}"
    )
    if ir is not None and ir["input_ids"] != ia["input_ids"]:
        ev += f"; the reference ran on {ir['input_ids']}"
    return _check("input_ids", None, not same, ev)


def _side_checks(label: str, d: Path, info: dict, dtype: str, torch: Any) -> list[dict]:
    from . import reference

    checks: list[dict] = []
    wc = info.get("weights_check") or {}
    if wc.get("n_differ"):
        names = ", ".join(x["name"] for x in wc["differ"][:4])
        checks.append(
            _check(
                "weights_match_checkpoint",
                label,
                True,
                f"{wc['n_differ']} of {wc['checked']} loaded tensors differ from the checkpoint in "
                f"{label} (e.g. {names}): loading replaced them (e.g. _init_weights re-run after "
                f"loading, as transformers 5.0/5.1 do: hotfix --with init_weights)",
                differ=wc["differ"][:10],
            )
        )
    else:
        checks.append(
            _check(
                "weights_match_checkpoint",
                label,
                False,
                f"all {wc.get('checked', 0)} checkpoint tensors loaded unchanged in {label}",
            )
        )

    bufs = json.loads((d / BUFFERS).read_text())
    bad = [b for b in bufs["buffers"] if b.get("finite") is False or (b.get("all_zero") and not b.get("persistent"))]
    checks.append(
        _check(
            "buffers_finite",
            label,
            bool(bad),
            "; ".join(
                f"{b['name']} ({'non-finite' if b.get('finite') is False else 'all zero'}, "
                f"{'persistent' if b['persistent'] else 'non-persistent'})"
                for b in bad
            )
            + f" in {label} at the first forward"
            if bad
            else f"{len(bufs['buffers'])} buffer(s) finite, no non-persistent buffer all zero in {label}",
        )
    )

    cfg = reference.read_config(d)
    checks += _inv_freq_checks(label, bufs.get("rotary") or {}, bufs["buffers"], cfg, torch, reference)
    checks += _rope_checks(label, d, cfg, dtype, torch, reference)

    head, conf = info.get("lm_head") or {}, info.get("config") or {}
    if conf.get("tie_word_embeddings") and head.get("present"):
        tied = head.get("same_storage") or head.get("equal_values")
        ev = (
            "lm_head shares embed_tokens' storage"
            if head.get("same_storage")
            else "lm_head equals embed_tokens (separate storage)"
            if tied
            else f"config.tie_word_embeddings is true but lm_head.weight is not embed_tokens.weight in {label} "
            f"(max |diff| {_fmt(head.get('max_abs_diff'))})"
        )
        checks.append(_check("lm_head_tied", label, not tied, ev))
    else:
        checks.append(_check("lm_head_tied", label, False, "config does not tie the head: nothing to check"))
    return checks


def _inv_freq_checks(
    label: str, rotary: dict, buffers: list[dict], cfg: dict, torch: Any, reference: Any
) -> list[dict]:
    """inv_freq as the forward used it, against 1/theta^(2i/d) recomputed in fp64; and its dtype."""
    used = rotary.get("after_call") or rotary.get("at_call")
    persistent = next((b["persistent"] for b in buffers if b["name"].endswith(".inv_freq")), None)
    hint = (
        ": a non-persistent buffer (not in the checkpoint) that loading left uninitialised; recompute it in the "
        "model's _init_weights (hotfix patch inv_freq_guard)"
        if persistent is False
        else ""
    )
    if not used or "values" not in used:
        why = "no inv_freq recorded (no rotary module, or too large to store)"
        return [
            _check("inv_freq_values", label, False, why, skipped=True),
            _check("inv_freq_dtype", label, False, why, skipped=True),
        ]
    expected = reference.inv_freq(cfg, torch.float64)
    seen = torch.tensor(used["values"], dtype=torch.float64)
    eps = torch.finfo(getattr(torch, used["dtype"])).eps if used["dtype"] in TOLERANCE else 1e-3
    dim = reference.rotary_dim(cfg)
    restored = ""
    at = rotary.get("at_call")
    if at and at.get("values") is not None and at["values"] != used["values"]:
        restored = f" (at call: {_describe_values(at, expected, torch, label)}; the model replaced it inside forward)"
    if seen.shape != expected.shape:
        ev = (
            f"inv_freq in {label} has {seen.numel()} entries, expected {expected.numel()} "
            f"(head_dim {reference.head_dim(cfg)} * partial_rotary_factor {cfg.get('partial_rotary_factor', 1.0)}"
            f" = rotary dim {dim}, / 2)"
        )
        values = _check("inv_freq_values", label, True, ev + restored)
    else:
        diff = (seen - expected).abs()
        tol = 16 * eps * expected.abs()
        ok = bool(torch.isfinite(seen).all()) and bool((diff <= tol).all())
        ev = (
            f"inv_freq in {label} matches 1/theta^(2i/{dim}) to {used['dtype']} precision "
            f"(max |diff| {float(diff.max()):.1e})"
            if ok
            else _describe_values(used, expected, torch, label) + hint
        )
        values = _check(
            "inv_freq_values",
            label,
            not ok,
            ev + restored,
            max_abs_diff=float(diff.nan_to_num(math.inf).max()),
            seen=used["values"][:8],
            expected=expected.tolist()[:8],
        )
    low = used["dtype"] in ("bfloat16", "float16")
    ev = (
        f"inv_freq is {used['dtype']} in {label}: downcast from float32, so RoPE angles pos * inv_freq lose "
        f"precision at positions > 0"
        if low
        else f"inv_freq is {used['dtype']} in {label}"
    )
    if at and at.get("dtype") != used["dtype"]:
        ev += f" (at call it was {at['dtype']}; the model replaced it inside forward)"
    return [values, _check("inv_freq_dtype", label, low, ev)]


def _describe_values(summary: dict, expected: Any, torch: Any, label: str) -> str:
    """'inv_freq all zero in B', 'inv_freq holds garbage in B (...)': what a user reads first."""
    vals = summary.get("values")
    if vals is None:
        return f"inv_freq in {label} is {summary.get('dtype')}; values not stored"
    seen = torch.tensor(vals, dtype=torch.float64)
    if summary.get("all_zero"):
        return (
            f"inv_freq all zero in {label} (expected {expected.numel()} values from {float(expected[0]):.3g} to "
            f"{float(expected[-1]):.3g})"
        )
    if not bool(torch.isfinite(seen).all()):
        return f"inv_freq holds non-finite values in {label}"
    if seen.shape != expected.shape:
        return f"inv_freq has {seen.numel()} entries in {label}, expected {expected.numel()}"
    d = float((seen - expected).abs().max())
    shown = ", ".join(f"{v:.3g}" for v in vals[:4])
    return f"inv_freq holds garbage in {label} (max |diff| {d:.2e} from the expected values; seen {shown}, ...)"


def _rope_angles(cos: Any, sin: Any, torch: Any) -> tuple[Any, Any, str]:
    """The per-frequency cos/sin of a RoPE table in the transformers layout cat(f, f), or interleaved."""
    half = cos.shape[-1] // 2
    if torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:]):
        return cos[..., :half], sin[..., :half], "half-duplicated"
    if torch.equal(cos[..., 0::2], cos[..., 1::2]) and torch.equal(sin[..., 0::2], sin[..., 1::2]):
        return cos[..., 0::2], sin[..., 0::2], "interleaved"
    return cos[..., :half], sin[..., :half], "unrecognised"


def _rotate(x: Any, c: Any, s: Any, pairing: str, span: str, torch: Any) -> Any:
    """Rotate `x` (batch, heads, seq, head_dim) by per-frequency c/s (seq, r/2): a candidate RoPE layout."""
    r = 2 * c.shape[-1]
    hd = x.shape[-1]
    lo, hi = (0, r) if span == "first" else (hd - r, hd)
    xr = x[..., lo:hi]
    if pairing == "half-split":
        x1, x2 = xr[..., : r // 2], xr[..., r // 2 :]
        rot = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    return torch.cat((x[..., :lo], rot, x[..., hi:]), dim=-1)


def _rope_checks(label: str, d: Path, cfg: dict, dtype: str, torch: Any, reference: Any) -> list[dict]:
    """Replay RoPE on the side's own q/k_norm with its own cos/sin: which pairing reproduces its q/k_rope?

    Isolates the rotation step: a wrong table (inv_freq) does not make this check fire, only a
    rotation that is not transformers' half-split on the first `rotary_dim` channels.
    """
    idx = _index(d)
    dim, hd = reference.rotary_dim(cfg), reference.head_dim(cfg)
    ec, es = idx["by_key"].get(("rope.cos", None)), idx["by_key"].get(("rope.sin", None))
    if ec is None or es is None:
        why = "no rope.cos/rope.sin recorded"
        return [
            _check("rope_dims", label, False, why, skipped=True),
            _check("rope_pairing", label, False, why, skipped=True),
        ]
    cos, sin = _load(d, ec), _load(d, es)
    dims = _check(
        "rope_dims",
        label,
        cos.shape[-1] != dim,
        f"cos/sin in {label} cover {cos.shape[-1]} channels; the config's rotary dim is {dim} "
        f"(head_dim {hd} * partial_rotary_factor {cfg.get('partial_rotary_factor', 1.0)})",
    )
    if not (bool(torch.isfinite(cos).all()) and bool(torch.isfinite(sin).all())):
        return [
            dims,
            _check(
                "rope_pairing", label, False, f"cos/sin in {label} are not finite: pairing not testable", skipped=True
            ),
        ]
    c, s, layout = _rope_angles(cos, sin, torch)
    candidates = [("half-split", "first"), ("interleaved", "first"), ("half-split", "last"), ("interleaved", "last")]
    tested = 0
    for layer in range(idx.get("num_layers") or 0):
        for which in ("q", "k"):
            e_in, e_out = idx["by_key"].get((f"{which}_norm", layer)), idx["by_key"].get((f"{which}_rope", layer))
            if e_in is None or e_out is None:
                continue
            x, y = _load(d, e_in), _load(d, e_out)
            if x.shape != y.shape or x.shape[-1] < cos.shape[-1]:
                continue
            tested += 1
            thr = threshold(dtype, dtype, float(y.abs().nan_to_num(0.0).max()))
            canonical = reference.apply_rope(x, cos, sin)
            err = float((canonical - y).abs().max())
            if not _gt(err, thr):
                continue
            found = None
            for pairing, span in candidates[1:]:
                e = float((_rotate(x, c, s, pairing, span, torch) - y).abs().max())
                if not _gt(e, thr):
                    found = (pairing, span, e)
                    break
            where = f"layer {layer} {which}_rope"
            if found is None:
                ev = (
                    f"{label}'s {where} is not its own {which}_norm rotated by its own cos/sin in any known layout "
                    f"(half-split: max |diff| {err:.2e}; cos/sin layout {layout})"
                )
            else:
                pairing, span, e = found
                part = f" on the {span} {dim} of {hd} channels" if dim < hd else ""
                ev = (
                    f"RoPE pairs {pairing} channels{part} in {label}, transformers uses half-split on the first "
                    f"{dim} (reproduces {label}'s {where} to {e:.1e}; half-split misses by {err:.2e})"
                )
            return [
                dims,
                _check(
                    "rope_pairing",
                    label,
                    True,
                    ev,
                    layer=layer,
                    pairing=found and found[0],
                    span=found and found[1],
                    half_split_error=err,
                ),
            ]
    if not tested:
        return [
            dims,
            _check("rope_pairing", label, False, f"no q/k_norm + q/k_rope pairs recorded in {label}", skipped=True),
        ]
    return [
        dims,
        _check(
            "rope_pairing",
            label,
            False,
            f"{label}'s q/k_rope = reference half-split RoPE of its own q/k_norm and cos/sin "
            f"(first {dim} of {hd} channels), {tested} tensors",
        ),
    ]


def _check_matches_reference(label: str, rows: list[dict], side_key: str) -> dict:
    """The first stage where one side leaves fp64 beyond its own dtype's tolerance (both wrong alike shows here)."""
    thr_key = "threshold_" + side_key[0]
    first = next((r for r in rows if side_key in r and _gt(r[side_key], r[thr_key])), None)
    if first is None:
        worst = max((r[side_key] for r in rows if side_key in r), default=0.0)
        return _check(
            "matches_reference",
            label,
            False,
            f"{label} stays within threshold of the fp64 reference at every stage (max |diff| {worst:.1e})",
        )
    p0, rest = first[f"{side_key}_pos0"], first[f"{side_key}_rest"]
    where = _where(p0, rest, first[thr_key])
    return _check(
        "matches_reference",
        label,
        True,
        f"{label} leaves the fp64 reference at {first['key']} ({where}: position 0 {_fmt(p0)}, "
        f"positions > 0 {_fmt(rest)}, threshold {first[thr_key]:.1e})",
        stage=first["key"],
    )


def _check_noise(row: dict, labels: tuple[str, str], dtype_a: str, dtype_b: str) -> dict:
    """fp64 noise test: rounding makes both sides a little wrong; a bug makes one orders of magnitude worse."""
    if "a_ref" not in row:
        return _check(
            "fp64_noise", None, False, "no fp64 reference at this stage: noise test not possible", skipped=True
        )
    verdict = _side_verdict(row, labels)
    a, b = row["a_ref"], row["b_ref"]
    ratio = _ratio(a, b)
    return _check(
        "fp64_noise",
        verdict["wrong"],
        verdict["wrong"] is not None,
        f"at {row['key']}: {verdict['text']} (ratio {ratio:.1e}; fp64 tolerance {row['threshold_a']:.1e} "
        f"{dtype_a}, {row['threshold_b']:.1e} {dtype_b})",
        ratio=ratio,
    )


# ---------------------------------------------------------------------------------------------
# the driver (standard library only: runs anywhere, puts each side in its env)


@dataclass(frozen=True)
class Side:
    """One side of a comparison: an interpreter that sees one transformers release, and what to load in it."""

    label: str
    python: Path
    model_dir: Path
    describe: str
    dtype: str = "float32"
    attn: str = "eager"
    device: str = "cpu"
    pythonpath: Path | None = None  # only for an interpreter that does not see opensci_patch by itself


def _run(side: Side, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """`side.python -m opensci_patch.diagnose ...` with a clean environment (as `envs.run_python`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    if side.pythonpath is not None:
        env["PYTHONPATH"] = str(side.pythonpath)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return subprocess.run([str(side.python), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _tail(text: str, n: int = 15) -> str:
    return "\n".join([line for line in text.splitlines() if line.strip()][-n:])


class DiagnoseError(OpensciPatchError):
    """A diagnose step crashed (not the model code failing, which is a finding): see the log tail."""


def _step(
    side: Side, args: list[str], what: str, timeout: float, ok: Iterable[int] = (0,)
) -> subprocess.CompletedProcess[str]:
    try:
        proc = _run(side, ["-m", "opensci_patch.diagnose", *args], timeout)
    except subprocess.TimeoutExpired:
        raise DiagnoseError(f"{what} for {side.label} ran over {timeout:.0f} s") from None
    if proc.returncode not in ok:
        raise DiagnoseError(
            f"{what} for {side.label} ({side.describe}) failed with exit {proc.returncode}:\n"
            f"{_tail(proc.stdout + proc.stderr)}"
        )
    return proc


def _probe_side(side: Side, out: Path, prompt: str, timeout: float, attn: str | None = None) -> dict:
    args = [
        "probe",
        str(side.model_dir),
        "--out",
        str(out),
        "--dtype",
        side.dtype,
        "--attn",
        attn or side.attn,
        "--device",
        side.device,
        "--prompt",
        prompt,
    ]
    proc = _step(side, args, "probe", timeout, ok=(0, 1))  # 1: the model failed to load or run (recorded)
    if not (out / MODEL_INFO).is_file():  # exit 1 from a crash of the probe itself
        raise DiagnoseError(f"probe for {side.label} ({side.describe}) crashed:\n{_tail(proc.stdout + proc.stderr)}")
    return json.loads((out / MODEL_INFO).read_text())


def _parallel(jobs: list[Callable[[], Any]], parallel: bool) -> list[Any]:
    if not parallel or len(jobs) < 2:
        return [job() for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        return [f.result() for f in [pool.submit(job) for job in jobs]]


def _weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def compare_sides(
    a: Side,
    b: Side,
    out_dir: Path,
    *,
    prompt: str = DEFAULT_PROMPT,
    reference: str = "auto",
    reference_model: Path | None = None,
    parallel: bool | None = None,
    timeout: float = 900.0,
    log: Log = print,
) -> dict:
    """Probe both sides, run the fp64 reference, compare and run the checks; write `out_dir/diagnose.json`.

    The engine behind `diagnose`; also usable with any two interpreters and model dirs (the
    tests compare a deliberately broken model dir with a good one on one interpreter).
    `reference`: "on", "off", or "auto" (on for checkpoints up to 1 GiB: it holds fp64 weights).
    `parallel` (default: small checkpoints only) probes both sides at once: twice the memory.
    """
    if reference not in ("auto", "on", "off"):
        raise OpensciPatchError(f"reference {reference!r} not one of auto, on, off")
    t0 = time.monotonic()
    out_dir = Path(out_dir).absolute()
    _prepare_out(out_dir)
    ref_model = (reference_model or a.model_dir).absolute()
    small = _weights_bytes(ref_model) <= REFERENCE_MAX_WEIGHT_BYTES
    parallel = small if parallel is None else parallel
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "sides": {s.label: _side_json(s) for s in (a, b)},
        "prompt": prompt,
        "out_dir": str(out_dir),
        "timings": {},
    }
    log(f"probing {a.label} ({a.describe}) and {b.label} ({b.describe})")
    infos = _parallel(
        [lambda s=s: _probe_side(s, out_dir / f"probe-{s.label}", prompt, timeout) for s in (a, b)], parallel
    )
    result["timings"]["probes_s"] = round(time.monotonic() - t0, 1)
    for s, info in zip((a, b), infos, strict=True):
        result["sides"][s.label] |= {
            "status": info["status"],
            "versions": info.get("versions"),
            "peak_rss_mib": info.get("peak_rss_mib"),
            "timings": info.get("timings"),
            "notes": info.get("notes"),
            "error": info.get("error"),
        }
    failed = [(s, i) for s, i in zip((a, b), infos, strict=True) if i["status"] != "ok"]
    if failed:
        why = "; ".join(
            f"{s.label} ({s.describe}) {i['status']}: {i['error']['type']}: {i['error']['message']}" for s, i in failed
        )
        result |= {
            "status": "error",
            "diverged": None,
            "verdict": f"cannot compare: {why}",
            "checks": [],
            "first_divergence": None,
        }
        return _finish(result, out_dir, t0, log)

    ref_dir = None
    if reference == "on" or (reference == "auto" and small):
        t1 = time.monotonic()
        ref_dir = out_dir / "reference"
        ids = ",".join(str(i) for i in infos[0]["input_ids"])
        _step(a, ["reference", str(ref_model), "--out", str(ref_dir), "--ids", ids], "fp64 reference", timeout)
        result["timings"]["reference_s"] = round(time.monotonic() - t1, 1)
    result["reference"] = "on" if ref_dir else f"off ({'asked' if reference == 'off' else 'weights over 1 GiB'})"

    cmp = _compare_in(
        a,
        out_dir,
        out_dir / f"probe-{a.label}",
        out_dir / f"probe-{b.label}",
        ref_dir,
        (a.label, b.label),
        timeout,
        "compare.json",
        result,
    )
    checks = cmp["checks"]
    first = cmp["first_divergence"]
    if first is not None and first["stage"] == "attn_out" and "sdpa" in (a.attn, b.attn):
        checks.append(_attention_rerun(a, b, out_dir, ref_dir, prompt, timeout, parallel, first, result))
    result |= {
        "status": "diverged" if first else "agree",
        "diverged": first is not None,
        "first_divergence": first,
        "first_divergence_verdict": cmp.get("first_divergence_verdict"),
        "checks": checks,
        "missing_stages": cmp["missing_stages"],
        "stages": cmp["stages"],
        "dtypes": cmp["dtypes"],
    }
    result["verdict"] = _verdict(result, a, b)
    return _finish(result, out_dir, t0, log)


def _compare_in(
    side: Side,
    out_dir: Path,
    da: Path,
    db: Path,
    ref: Path | None,
    labels: tuple[str, str],
    timeout: float,
    name: str,
    result: dict,
) -> dict:
    t1 = time.monotonic()
    args = ["compare", str(da), str(db), "--out", str(out_dir / name), "--labels", ",".join(labels)]
    if ref is not None:
        args += ["--ref", str(ref)]
    _step(side, args, "compare", timeout)
    result["timings"][name.removesuffix(".json") + "_s"] = round(time.monotonic() - t1, 1)
    return json.loads((out_dir / name).read_text())


def _attention_rerun(
    a: Side,
    b: Side,
    out_dir: Path,
    ref: Path | None,
    prompt: str,
    timeout: float,
    parallel: bool,
    first: dict,
    result: dict,
) -> dict:
    """First divergence at attn_out with SDPA on a side: does it go away with eager attention on both?"""
    _parallel(
        [lambda s=s: _probe_side(s, out_dir / f"probe-{s.label}-eager", prompt, timeout, attn="eager") for s in (a, b)],
        parallel,
    )
    cmp = _compare_in(
        a,
        out_dir,
        out_dir / f"probe-{a.label}-eager",
        out_dir / f"probe-{b.label}-eager",
        ref,
        (a.label, b.label),
        timeout,
        "compare-eager.json",
        result,
    )
    again = cmp["first_divergence"]
    gone = again is None or again["key"] != first["key"]
    ev = f"with eager attention on both sides the divergence at {first['key']} " + (
        "disappears" + (f" (next: {again['key']})" if again else ": the attention kernel (SDPA) differs")
        if gone
        else f"persists ({_fmt(again.get('ab_rest'))} at positions > 0): not the attention kernel"
    )
    return _check("attention_kernel", None, gone, ev)


def _side_json(s: Side) -> dict:
    return {
        "describe": s.describe,
        "python": str(s.python),
        "model_dir": str(s.model_dir),
        "dtype": s.dtype,
        "attn": s.attn,
        "device": s.device,
    }


def _prepare_out(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MARKER).exists())):
        raise DestinationError(f"{out_dir} exists and was not made by diagnose; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("created by opensci_patch.diagnose; safe to delete\n")


def _finish(result: dict, out_dir: Path, t0: float, log: Log) -> dict:
    result["timings"]["total_s"] = round(time.monotonic() - t0, 1)
    _write_json(out_dir / RESULT, result)
    for line in format_report(result):
        log(line)
    log(f"details: {out_dir / RESULT}")
    return result


def _verdict(result: dict, a: Side, b: Side) -> str:
    first = result["first_divergence"]
    fired = [c for c in result["checks"] if c["fired"] and c["name"] not in ("fp64_noise", "matches_reference")]
    if first is None:
        off_ref = [c for c in result["checks"] if c["name"] == "matches_reference" and c["fired"]]
        text = f"{a.label} and {b.label} agree at every stage"
        if off_ref:
            text += "; but " + "; ".join(c["evidence"] for c in off_ref)
        if fired:
            text += "; checks that fired anyway: " + "; ".join(c["evidence"] for c in fired)
        return text
    sv = result.get("first_divergence_verdict") or {}
    wrong = sv.get("wrong")
    where = first.get("where")
    who = (
        f"{wrong} is wrong"
        if wrong in (a.label, b.label)
        else "both sides are wrong"
        if wrong == "both"
        else (f"{a.label} and {b.label} differ")
    )
    text = f"{who} from {first['key']} on" + (f", at {where}" if where and where != "shape" else "")
    if wrong is None and "a_ref" in first:
        text = f"{a.label} and {b.label} differ from {first['key']} on by rounding noise only"

    def relevant(c: dict) -> bool:
        allowed = EXPLAINS.get(c["name"])
        side_ok = wrong in (None, "both") or c["side"] in (None, wrong)
        return side_ok and (allowed is None or first["stage"] in allowed)

    causes = [c for c in fired if relevant(c)]
    others = [c for c in fired if not relevant(c)]
    if causes:
        text += "; likely cause: " + "; ".join(c["evidence"] for c in causes)
    elif wrong is not None:
        text += "; no named check explains it: look at the stage's own computation in the probe files"
    if others:
        text += "; also fired: " + "; ".join(c["evidence"] for c in others)
    return text


def format_report(result: dict) -> list[str]:
    """The short human report: first divergence with per-position numbers, the checks that fired, the verdict."""
    sides = result["sides"]
    labels = list(sides)
    lines = [f"diagnose: {lab} = {sides[lab]['describe']}" for lab in labels]
    if result["status"] == "error":
        return [*lines, f"verdict: {result['verdict']}"]
    first = result["first_divergence"]
    lines.append(f"prompt {result['prompt']!r}; fp64 reference: {result.get('reference')}")
    if first is None:
        last = result["stages"][-1] if result["stages"] else None
        lines.append(
            "no divergence: every stage agrees within threshold"
            + (
                f" (logits: max|{labels[0]}-{labels[1]}| {_fmt(_nanmax(last['ab_pos0'], last['ab_rest']))})"
                if last and "ab_pos0" in last
                else ""
            )
        )
    elif first.get("where") == "shape":
        lines.append(f"first divergence: {first['key']}: {first['why']}")
    else:
        agree0 = first["where"] == "positions > 0 only"
        lines.append(
            f"first divergence: {first['key']}, at {first['where']}" + (" (position 0 agrees)" if agree0 else "")
        )
        lines.append(
            f"  max|{labels[0]}-{labels[1]}|  position 0: {_fmt(first['ab_pos0'])}  positions > 0: "
            f"{_fmt(first['ab_rest'])}  (threshold {first['threshold']:.1e}, {'/'.join(result['dtypes'])})"
        )
        lines.append("  per position: " + " ".join(_fmt(x) for x in first["ab_per_position"]))
        if "a_ref" in first:
            lines.append(
                f"  vs fp64:  {labels[0]} {_fmt(first['a_ref_pos0'])} / {_fmt(first['a_ref_rest'])}   "
                f"{labels[1]} {_fmt(first['b_ref_pos0'])} / {_fmt(first['b_ref_rest'])}  "
                f"(position 0 / positions > 0)"
            )
        if result.get("first_divergence_verdict"):
            lines.append(f"  -> {result['first_divergence_verdict']['text']}")
    fired = [c for c in result["checks"] if c["fired"]]
    lines.append("checks fired:" if fired else "checks fired: none")
    lines += [f"  [{c['side'] or '-'}] {c['name']}: {c['evidence']}" for c in fired]
    passed = sorted(
        {
            c["name"] + (f"[{c['side']}]" if c["side"] else "")
            for c in result["checks"]
            if not c["fired"] and not c.get("skipped")
        }
    )
    if passed:
        lines.append("checks passed: " + ", ".join(passed))
    lines.append(f"verdict: {result['verdict']}")
    return lines


def parse_cell(spec: str, *, torch_build: str = DEFAULT_TORCH_BUILD) -> Cell:
    """A cell from the command line: a matrix cell id (tf5.2.0-cpu-patched-float32-eager) or
    VERSION[:FIELD...] where each field is a model variant, torch build, dtype or attention
    (their value sets do not overlap), e.g. 5.2.0:structural or 4.57.6:patched:bfloat16:sdpa."""
    m = re.fullmatch(r"tf([^-]+)-([^-]+)-([^-]+)-([^-]+)-([^-]+)", spec)
    if m:
        fields = {"transformers": m[1], "torch": m[2], "model": m[3], "dtype": m[4], "attn": m[5]}
    else:
        version, *rest = spec.split(":")
        fields = {"transformers": version, "torch": torch_build, "model": "patched"}
        kinds = (("model", tuple(MODELS)), ("torch", tuple(TORCH_BUILDS)), ("dtype", DTYPES), ("attn", ATTENTION))
        for value in rest:
            kind = next((k for k, values in kinds if value in values), None)
            if kind is None:
                raise OpensciPatchError(
                    f"cell {spec!r}: {value!r} is no model variant ({', '.join(MODELS)}), torch build "
                    f"({', '.join(TORCH_BUILDS)}), dtype ({', '.join(DTYPES)}) or attention ({', '.join(ATTENTION)})"
                )
            fields[kind] = value
    allowed = {"model": tuple(MODELS), "torch": tuple(TORCH_BUILDS), "dtype": DTYPES, "attn": ATTENTION}
    for kind, values in allowed.items():
        if kind in fields and fields[kind] not in values:
            raise OpensciPatchError(
                f"cell {spec!r}: unknown {kind} {fields[kind]!r}; choose one of {', '.join(values)}"
            )
    return Cell(**fields)


def _describe(cell: Cell, info: str = "") -> str:
    return (
        f"transformers {cell.transformers} (torch {cell.torch}), {cell.model}, {cell.dtype}, "
        f"{cell.attn} attention{info}"
    )


def diagnose(
    a: Cell,
    b: Cell,
    model_dir: Path | None = None,
    out_dir: Path = Path("diagnose"),
    *,
    prompt: str = DEFAULT_PROMPT,
    reference: str = "auto",
    env_root: Path | None = None,
    keep_models: bool = False,
    timeout: float = 900.0,
    log: Log = print,
) -> dict:
    """Name the first stage where cells `a` and `b` disagree on `model_dir` and the likely cause.

    Each cell runs in its own per-release env (built on first use). The model dir is prepared
    once per model variant with `opensci-patch hotfix` inside the env of the first cell that
    needs it (the patches are pure source rewrites, the same in every env) under
    `out_dir/models/` and removed afterwards unless `keep_models`; the user's dir is only read.
    Returns the result dict (also `out_dir/diagnose.json`): `status` is "diverged", "agree"
    or "error" (a side failed to load or run: a finding, with the error), `diverged` a bool.
    """
    from .envs import ensure_env

    model_dir = Path(model_dir or FIXTURE_DIR).absolute()
    validate_model_dir(model_dir)
    out_dir = Path(out_dir).absolute()
    for cell in (a, b):
        if cell.model not in MODELS:
            raise OpensciPatchError(f"unknown model variant {cell.model!r}: choose one of {', '.join(MODELS)}")
        if cell.model in OWN_CHECKPOINT and model_dir != FIXTURE_DIR.absolute():
            raise OpensciPatchError(f"{cell.model!r} runs the shipped weights under generated code; drop --model")
    envs = {}
    for cell in (a, b):  # bad versions and install failures stop here, before anything is written
        key = (cell.transformers, cell.torch)
        if key not in envs:
            envs[key] = ensure_env(cell.transformers, cell.torch, root=env_root, log=log)
    _prepare_out(out_dir)
    models_root = out_dir / "models"
    prepared: dict[str, Path] = {c.model: model_dir for c in (a, b) if MODELS[c.model] is None}
    t0 = time.monotonic()
    if len(prepared) < len({a.model, b.model}):
        _fresh_dir(models_root)
    try:
        for label, cell in (("A", a), ("B", b)):
            if cell.model in prepared:
                continue
            extras = MODELS[cell.model] or ()
            dst = models_root / re.sub(r"[^A-Za-z0-9_.-]", "_", cell.model)
            env = envs[(cell.transformers, cell.torch)]
            source = model_dir
            if cell.model in OWN_CHECKPOINT:
                from .generated_style import ensure_generated

                source = ensure_generated(env_root, log=log)
            log(f"hotfix ({cell.model}) in transformers {cell.transformers}: {dst}")
            proc = subprocess.run(
                [str(env.python), "-m", "opensci_patch.cli", "hotfix", str(source), "--out", str(dst), *extras],
                env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")},
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if proc.returncode != 0:
                raise DiagnoseError(f"hotfix ({cell.model}) for {label} failed:\n{_tail(proc.stdout + proc.stderr)}")
            prepared[cell.model] = dst
        sides = [
            Side(
                label,
                envs[(c.transformers, c.torch)].python,
                prepared[c.model],
                _describe(c),
                c.dtype,
                c.attn,
                c.device,
            )
            for label, c in (("A", a), ("B", b))
        ]
        prep_s = round(time.monotonic() - t0, 1)
        result = compare_sides(
            sides[0],
            sides[1],
            out_dir,
            prompt=prompt,
            reference=reference,
            reference_model=model_dir,
            timeout=timeout,
            log=log,
        )
    finally:
        if not keep_models and (models_root / MARKER).exists():
            shutil.rmtree(models_root)
    result["cells"] = {"A": asdict(a) | {"id": a.id}, "B": asdict(b) | {"id": b.id}}
    result["model_dir"] = str(model_dir)
    result["timings"]["prepare_s"] = prep_s
    _write_json(out_dir / RESULT, result)
    return result


# ---------------------------------------------------------------------------------------------
# command line: the CLI's `diagnose` subcommand, and the in-env entry points


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `opensci-patch diagnose A B` (for cli.py to attach to its subparser)."""
    p.add_argument("a", metavar="A", help="cell, e.g. 4.57.6:structural or tf4.57.6-cpu-structural-float32-eager")
    p.add_argument("b", metavar="B", help="cell, e.g. 5.2.0:structural (fields: variant, torch build, dtype, attn)")
    p.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: the shipped fixture)")
    p.add_argument("--out", type=Path, default=Path("diagnose"), help="output dir (default: ./diagnose)")
    p.add_argument(
        "--torch",
        default=DEFAULT_TORCH_BUILD,
        choices=list(TORCH_BUILDS),
        help="torch build for cells that do not name one",
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument(
        "--reference",
        choices=["auto", "on", "off"],
        default="auto",
        help="fp64 reference forward (auto: checkpoints up to 1 GiB)",
    )
    p.add_argument("--env-root", type=Path, default=None, help="where the per-release envs live")
    p.add_argument("--keep-models", action="store_true", help="keep the hotfixed model dirs under OUT/models")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Exit 0: the cells agree; 1: they diverge, or a side failed to load or run (both in diagnose.json)."""
    result = diagnose(
        parse_cell(args.a, torch_build=args.torch),
        parse_cell(args.b, torch_build=args.torch),
        args.model,
        args.out,
        prompt=args.prompt,
        reference=args.reference,
        env_root=args.env_root,
        keep_models=args.keep_models,
        timeout=args.timeout,
        log=lambda m: print(m, flush=True),
    )
    return 0 if result["status"] == "agree" else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m opensci_patch.diagnose", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="the whole diagnosis of two cells (what `opensci-patch diagnose` runs)")
    add_cli_arguments(p)
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("probe", help="inside an env: record every stage of one forward")
    p.add_argument("model", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--attn", default="eager", choices=list(ATTENTION))
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)

    def run_probe(args: argparse.Namespace) -> int:
        info = probe(
            args.model,
            args.out,
            dtype=args.dtype,
            attn=args.attn,
            device=args.device,
            prompt=args.prompt,
            log=lambda m: print(m, file=sys.stderr),
        )
        print(f"{info['status']}: {args.out}")
        return 0 if info["status"] == "ok" else 1

    p.set_defaults(func=run_probe)

    p = sub.add_parser("reference", help="inside an env: every stage of the fp64 reference forward")
    p.add_argument("model", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ids", required=True, help="comma-separated token ids (the probe's input_ids)")
    p.set_defaults(
        func=lambda args: (reference_probe(args.model, args.out, [int(x) for x in args.ids.split(",")]), 0)[1]
    )

    p = sub.add_parser("compare", help="inside an env: compare two probes (and the reference), run the checks")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--ref", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--labels", default="A,B")

    def run_compare(args: argparse.Namespace) -> int:
        labels = tuple(args.labels.split(","))
        _write_json(args.out, compare(args.a, args.b, args.ref, (labels[0], labels[1])))
        return 0

    p.set_defaults(func=run_compare)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except OpensciPatchError as exc:
        print(f"opensci-patch diagnose: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
