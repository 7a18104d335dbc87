"""An independent forward pass of the open-sci architecture in plain torch.

No transformers code is imported: the configuration is read from config.json and the
weights straight from the safetensors files. Run in float64 it is the oracle that says
which transformers release is right when two disagree; run in float32 with gradients it
is also what trains the shipped fixture checkpoint.

The numerics follow the architecture, not any one transformers release: RMSNorm in the
compute dtype, q/k RMSNorm per head before RoPE, RoPE on the first
`head_dim * partial_rotary_factor` channels of each head in the half-split layout
(`rotate_half`), SiLU-gated MLP, biases where the config says so, tied head.

It models that architecture only (`MODELS`); `not_modelled` says why a checkpoint is outside it (a fused
`qkv_proj`, a config that names its sizes otherwise, LayerNorm with a bias, another activation or RoPE type,
any weight it would not read), and `capture` then records the reference as "not applicable: <why>"
instead of crashing on a missing weight or reporting a gap that only says the architectures differ.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from opensci_patch._util.errors import ModelDirError
from opensci_patch._util.model_dir import read_config

Params = dict[str, torch.Tensor]
# stage name, layer index (None outside layers), tensor
StageHook = Callable[[str, "int | None", torch.Tensor], None]


# the config keys the reference forward reads, and those it cannot do without
CONFIG_KEYS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
    "head_dim", "rms_norm_eps", "rope_theta", "partial_rotary_factor", "vocab_size", "tie_word_embeddings",
)  # fmt: skip
REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
MODELS = (
    "decoder-only Llama/Qwen3/open-sci shape: separate q/k/v/o projections, RMSNorm (weight only), SiLU-gated MLP "
    "(gate/up/down), default RoPE on head_dim * partial_rotary_factor channels (half-split), optional q/k norms "
    "and projection biases, tied or untied head"
)
# per layer: the weights it reads (all needed), and those it reads where present
_LAYER_NEEDS = (
    "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)  # fmt: skip
_LAYER_MAY = (
    "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    *(f"{m}.bias" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
)  # fmt: skip


def resolved_config(model_dir: Path, model_config=None) -> dict:
    """config.json, completed with the values the loaded model's config class resolved.

    A key missing from config.json takes the config class's default in the model (e.g. the shipped
    class's `rms_norm_eps=1e-5`); the reference must use the same value, not a guess of its own, or it
    reports a gap that is not there. 5.x library configs keep `rope_theta` in `rope_parameters`.
    A key neither side knows is a ModelDirError naming it.
    """
    cfg = _completed(model_dir, model_config)
    missing = [k for k in REQUIRED_KEYS if cfg.get(k) is None]
    if missing:
        raise ModelDirError(f"{Path(model_dir) / 'config.json'}: lacks {', '.join(missing)}; add it to the config")
    return cfg


def _completed(model_dir: Path, model_config=None) -> dict:
    cfg = read_config(model_dir)
    if model_config is not None:
        for key in CONFIG_KEYS:
            if cfg.get(key) is None:
                value = getattr(model_config, key, None)
                if value is None and key == "rope_theta":
                    value = (getattr(model_config, "rope_parameters", None) or {}).get("rope_theta")
                if value is not None:
                    cfg[key] = value
    return cfg


def not_modelled(model_dir: Path, model_config=None) -> str | None:
    """Why the checkpoint is not of the architecture this forward models (`MODELS`); None when it is.

    Read from config.json (completed as `resolved_config` does) and the names in the safetensors headers
    (no tensor is loaded). Every weight must be one the forward reads: one it would ignore (a LayerNorm
    bias, a fused projection) would make its logits those of another model."""
    cfg = _completed(model_dir, model_config)
    missing = [k for k in REQUIRED_KEYS if cfg.get(k) is None]
    if missing:
        return f"config.json names its sizes otherwise (no {', '.join(missing)})"
    act = cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu"
    if act not in ("silu", "swish"):
        return f"hidden_act {act!r} (the reference models SiLU)"
    scaling = cfg.get("rope_scaling")
    kind = (scaling.get("rope_type") or scaling.get("type")) if isinstance(scaling, dict) else None
    if kind not in (None, "default"):
        return f"rope_scaling of type {kind!r} (the reference models the default RoPE)"
    if cfg.get("layer_norm_eps") is not None and cfg.get("rms_norm_eps") is None:
        return "a LayerNorm (config layer_norm_eps; the reference models RMSNorm)"
    names = _weight_names(model_dir)
    needs = {"model.embed_tokens.weight", "model.norm.weight"}
    may = {"lm_head.weight"}
    for i in range(int(cfg["num_hidden_layers"])):
        needs |= {f"model.layers.{i}.{n}" for n in _LAYER_NEEDS}
        may |= {f"model.layers.{i}.{n}" for n in _LAYER_MAY}
    absent = sorted(needs - names)
    if absent:
        fused = next((n for n in sorted(names) if "qkv" in n or "query_key_value" in n), None)
        return f"no weight {absent[0]}" + (f" (a fused projection: {fused})" if fused else "")
    unread = sorted(names - needs - may)
    if unread:
        return f"weights it does not model, e.g. {unread[0]} ({len(unread)} in all)"
    return None


def _weight_names(model_dir: Path) -> set[str]:
    from safetensors import SafetensorError, safe_open

    names: set[str] = set()
    for f in weight_files(model_dir):
        try:
            with safe_open(str(f), "pt") as handle:
                names.update(handle.keys())
        except (SafetensorError, OSError) as exc:
            raise ModelDirError(f"{f}: cannot read safetensors ({exc})") from None
    return names


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: sharded (via the index) or single."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelDirError(f"{model_dir}: no *.safetensors weights found")
    return files


def load_params(model_dir: Path, dtype: torch.dtype = torch.float64) -> Params:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    params: Params = {}
    for f in weight_files(model_dir):
        try:
            for name, tensor in load_file(str(f)).items():
                params[name] = tensor.to(dtype)
        except (SafetensorError, OSError) as exc:
            raise ModelDirError(f"{f}: cannot read safetensors ({exc})") from None
    return params


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def rotary_dim(cfg: dict) -> int:
    return int(head_dim(cfg) * cfg.get("partial_rotary_factor", 1.0))


def inv_freq(cfg: dict, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """RoPE inverse frequencies, 1 / theta^(2i/d), computed in `dtype`."""
    dim = rotary_dim(cfg)
    theta = float(cfg.get("rope_theta", 10000.0))
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dtype) / dim))


def rope_cos_sin(cfg: dict, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.to(dtype)[:, None] * inv_freq(cfg, dtype)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); rotate the first cos.shape[-1] channels."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def _linear(p: Params, name: str, x: torch.Tensor) -> torch.Tensor:
    bias = p.get(f"{name}.bias")
    return torch.nn.functional.linear(x, p[f"{name}.weight"], bias)


def forward(
    params: Params,
    cfg: dict,
    input_ids: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    hook: StageHook | None = None,
) -> torch.Tensor:
    """Logits (batch, seq, vocab) for `input_ids` (batch, seq), causal, no cache, no padding.

    `hook(stage, layer, tensor)` sees every intermediate (for diagnose). Parameters are
    cast to `dtype` on the fly, so float32 parameters that require grad train normally.
    """

    def emit(stage: str, layer: int | None, t: torch.Tensor) -> torch.Tensor:
        if hook is not None:
            hook(stage, layer, t)
        return t

    p = {k: v.to(dtype) for k, v in params.items()}
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    n_heads, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = head_dim(cfg)
    bsz, seq = input_ids.shape
    positions = torch.arange(seq)
    cos, sin = rope_cos_sin(cfg, positions, dtype)
    emit("rope.cos", None, cos)
    emit("rope.sin", None, sin)
    mask = torch.full((seq, seq), float("-inf"), dtype=dtype).triu(1)

    h = emit("embed", None, p["model.embed_tokens.weight"][input_ids])
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}"
        x = emit("input_norm", i, rms_norm(h, p[f"{pre}.input_layernorm.weight"], eps))
        a = f"{pre}.self_attn"
        q = emit("q_proj", i, _linear(p, f"{a}.q_proj", x)).view(bsz, seq, n_heads, hd)
        k = emit("k_proj", i, _linear(p, f"{a}.k_proj", x)).view(bsz, seq, n_kv, hd)
        v = emit("v_proj", i, _linear(p, f"{a}.v_proj", x)).view(bsz, seq, n_kv, hd)
        if f"{a}.q_norm.weight" in p:
            q = rms_norm(q, p[f"{a}.q_norm.weight"], eps)
            k = rms_norm(k, p[f"{a}.k_norm.weight"], eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        emit("q_norm", i, q)
        emit("k_norm", i, k)
        q = emit("q_rope", i, apply_rope(q, cos, sin))
        k = emit("k_rope", i, apply_rope(k, cos, sin))
        if n_kv != n_heads:
            k = k.repeat_interleave(n_heads // n_kv, dim=1)
            v = v.repeat_interleave(n_heads // n_kv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + mask
        attn = torch.softmax(scores, dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(bsz, seq, n_heads * hd)
        attn = emit("attn_out", i, _linear(p, f"{a}.o_proj", attn))
        h = h + attn
        x = rms_norm(h, p[f"{pre}.post_attention_layernorm.weight"], eps)
        m = f"{pre}.mlp"
        mlp = _linear(
            p,
            f"{m}.down_proj",
            torch.nn.functional.silu(_linear(p, f"{m}.gate_proj", x)) * _linear(p, f"{m}.up_proj", x),
        )
        emit("mlp_out", i, mlp)
        h = emit("residual", i, h + mlp)
    h = emit("final_norm", None, rms_norm(h, p["model.norm.weight"], eps))
    head = p.get("lm_head.weight", p["model.embed_tokens.weight"])  # tied embeddings
    return emit("logits", None, h @ head.T)


def init_params(cfg: dict, generator: torch.Generator, std: float = 0.02) -> Params:
    """Fresh float32 parameters with the checkpoint's names (tied head: no lm_head entry)."""
    hd, d, ff = head_dim(cfg), cfg["hidden_size"], cfg["intermediate_size"]
    n_heads, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    p: Params = {"model.embed_tokens.weight": normal(cfg["vocab_size"], d), "model.norm.weight": torch.ones(d)}
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}"
        shapes = {
            "self_attn.q_proj": (n_heads * hd, d),
            "self_attn.k_proj": (n_kv * hd, d),
            "self_attn.v_proj": (n_kv * hd, d),
            "self_attn.o_proj": (d, n_heads * hd),
            "mlp.gate_proj": (ff, d),
            "mlp.up_proj": (ff, d),
            "mlp.down_proj": (d, ff),
        }
        for name, shape in shapes.items():
            p[f"{pre}.{name}.weight"] = normal(*shape)
            p[f"{pre}.{name}.bias"] = torch.zeros(shape[0])
        p[f"{pre}.self_attn.q_norm.weight"] = torch.ones(hd)
        p[f"{pre}.self_attn.k_norm.weight"] = torch.ones(hd)
        p[f"{pre}.input_layernorm.weight"] = torch.ones(d)
        p[f"{pre}.post_attention_layernorm.weight"] = torch.ones(d)
    return p
