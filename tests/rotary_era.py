"""Two 4.3x-era remote-code checkpoints "written by others", for `inv_freq_guard`'s buffers computed in `__init__`.

Written for opensci-patch's tests (not copied from any checkpoint), in the style of the InternLM/Llama/StableLM
files of transformers 4.30-4.45: a configuration file of their own, relative imports, a rotary class that computes
`inv_freq = 1 / base ** (arange(0, dim, 2) / dim)` in `__init__` (no `rope_init_fn`, no ROPE_INIT_FUNCTIONS):

- `cached`: RMSNorm, full rotary, and non-persistent `cos_cached`/`sin_cached` built by `_set_cos_sin_cache`
  in `__init__` and grown in `forward` (`seq_len > max_seq_len_cached`), as Llama 4.31-4.37 did;
- `partial`: LayerNorm with bias, 25% rotary (`partial_rotary_factor`), `inv_freq` only, cos/sin computed
  per forward from `position_ids`, as StableLM-style files did.

Both keep a `DynamicCache` (`update`), so that no break class but the buffers' shows on 5.x. Tiny seeded random
weights (2 layers, hidden 64, 4 query / 2 key-value heads), the shipped tokenizer.

`fused=True` gives the attention one `qkv_proj` (Phi-3 style) instead of q/k/v projections: an architecture the
fp64 reference does not model; `einops=True` also makes the file import einops (for `cell --require einops`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import FIXTURE_DIR

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

CONFIGURATION = '''\
from transformers import PretrainedConfig


class EraConfig(PretrainedConfig):
    model_type = "era"

    def __init__(self, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
                 partial_rotary_factor=1.0, norm_eps=1e-5, use_cache=True, pad_token_id=1, bos_token_id=0,
                 eos_token_id=0, tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.partial_rotary_factor = partial_rotary_factor
        self.norm_eps = norm_eps
        self.use_cache = use_cache
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
'''

HEAD = '''\
import math

import torch
import torch.nn.functional as F
from torch import nn

from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .configuration_era import EraConfig


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)
'''

CACHED_ROTARY = '''

class EraRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


Norm = EraRMSNorm


class EraRotaryEmbedding(nn.Module):
    def __init__(self, dim, max_position_embeddings=2048, base=10000, device=None):
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2).float().to(device) / self.dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._set_cos_sin_cache(
            seq_len=max_position_embeddings, device=self.inv_freq.device, dtype=torch.get_default_dtype()
        )

    def _set_cos_sin_cache(self, seq_len, device, dtype):
        self.max_seq_len_cached = seq_len
        t = torch.arange(self.max_seq_len_cached, device=device, dtype=self.inv_freq.dtype)
        freqs = torch.einsum("i,j->ij", t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin_cached", emb.sin().to(dtype), persistent=False)

    def forward(self, x, seq_len=None):
        if seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len=seq_len, device=x.device, dtype=x.dtype)
        return self.cos_cached[:seq_len].to(dtype=x.dtype), self.sin_cached[:seq_len].to(dtype=x.dtype)


def rotary_for(config, head_dim):
    rotary = EraRotaryEmbedding(head_dim, config.max_position_embeddings, base=config.rope_theta)
    return rotary, head_dim


def cos_sin(rotary, x, positions, total):
    cos, sin = rotary(x, seq_len=total)
    return cos[positions].unsqueeze(0).unsqueeze(0), sin[positions].unsqueeze(0).unsqueeze(0)
'''

PARTIAL_ROTARY = '''

Norm = nn.LayerNorm


class EraRotaryEmbedding(nn.Module):
    def __init__(self, dim, base=10000, device=None):
        super().__init__()
        self.dim = dim
        self.base = base
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float().to(device) / self.dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x, position_ids):
        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        position_ids_expanded = position_ids[:, None, :].float()
        freqs = (inv_freq_expanded @ position_ids_expanded).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


def rotary_for(config, head_dim):
    rotary_ndims = int(head_dim * config.partial_rotary_factor)
    return EraRotaryEmbedding(rotary_ndims, base=config.rope_theta), rotary_ndims


def cos_sin(rotary, x, positions, total):
    cos, sin = rotary(x, positions[None, :])
    return cos.unsqueeze(1), sin.unsqueeze(1)
'''

BODY = '''

class EraAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.rotary_emb, self.rotary_ndims = rotary_for(config, self.head_dim)

    def forward(self, hidden_states, positions, past_key_value=None):
        bsz, q_len, _ = hidden_states.size()
        q = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        total = q_len + (past_key_value.get_seq_length(self.layer_idx) if past_key_value is not None else 0)
        cos, sin = cos_sin(self.rotary_emb, v, positions, total)
        n = self.rotary_ndims
        q = torch.cat((q[..., :n] * cos + rotate_half(q[..., :n]) * sin, q[..., n:]), dim=-1)
        k = torch.cat((k[..., :n] * cos + rotate_half(k[..., :n]) * sin, k[..., n:]), dim=-1)
        if past_key_value is not None:
            k, v = past_key_value.update(k, v, self.layer_idx)
        groups = self.num_heads // self.num_key_value_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
        kv_len = k.shape[2]
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(bsz, q_len, -1)
        return self.o_proj(out)


class EraMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class EraDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = EraAttention(config, layer_idx)
        self.mlp = EraMLP(config)
        self.input_layernorm = Norm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = Norm(config.hidden_size, eps=config.norm_eps)

    def forward(self, hidden_states, positions, past_key_value=None):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), positions, past_key_value)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class EraPreTrainedModel(PreTrainedModel):
    config_class = EraConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["EraDecoderLayer"]
    _supports_cache_class = True

    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)


class EraModel(EraPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([EraDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Norm(config.hidden_size, eps=config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        positions = torch.arange(past_length, past_length + input_ids.shape[1], device=input_ids.device)
        hidden_states = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, positions, past_key_values if use_cache else None)
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values if use_cache else None
        )


class EraForCausalLM(EraPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = EraModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, past_key_values=None, use_cache=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, past_key_values=past_key_values, use_cache=use_cache)
        logits = self.lm_head(outputs.last_hidden_state).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)
'''

KINDS = {"cached": CACHED_ROTARY, "partial": PARTIAL_ROTARY}
MODELING = "modeling_era.py"

CONFIG = {
    "architectures": ["EraForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_era.EraConfig", "AutoModelForCausalLM": "modeling_era.EraForCausalLM"},
    "model_type": "era",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rope_theta": 500000.0,  # not the default 10000, so lost frequencies would show
    "norm_eps": 1e-05,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 1,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.36.2",
    "use_cache": True,
}


FUSED_INIT = """\
        self.qkv_proj = nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim, bias=False
        )
"""
FUSED_SPLIT = """\
        q, k, v = self.qkv_proj(hidden_states).split(
            [self.num_heads * self.head_dim, *[self.num_key_value_heads * self.head_dim] * 2],
            dim=-1,
        )
        q = q.view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = v.view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
"""
EINOPS_SPLIT = """\
        q, k, v = self.qkv_proj(hidden_states).split(
            [self.num_heads * self.head_dim, *[self.num_key_value_heads * self.head_dim] * 2],
            dim=-1,
        )
        q = rearrange(q, "b s (h d) -> b h s d", d=self.head_dim)
        k = rearrange(k, "b s (h d) -> b h s d", d=self.head_dim)
        v = rearrange(v, "b s (h d) -> b h s d", d=self.head_dim)
"""


def modeling_source(kind: str, *, fused: bool = False, einops: bool = False) -> str:
    text = HEAD + KINDS[kind] + BODY
    if fused:
        lines = text.splitlines(keepends=True)
        init = [i for i, line in enumerate(lines) if "self.q_proj = nn.Linear" in line]
        split = [i for i, line in enumerate(lines) if "q = self.q_proj(hidden_states)" in line]
        assert len(init) == len(split) == 1
        lines[split[0] : split[0] + 3] = [EINOPS_SPLIT if einops else FUSED_SPLIT]
        lines[init[0] : init[0] + 3] = [FUSED_INIT]
        text = "".join(lines)
    if einops:
        text = text.replace("from torch import nn\n", "from einops import rearrange\nfrom torch import nn\n", 1)
    return text


def config(kind: str) -> dict:
    return {**CONFIG, "partial_rotary_factor": 0.25 if kind == "partial" else 1.0}


def state_dict(kind: str, seed: int = 0, *, fused: bool = False) -> dict:
    """Random weights with the names and shapes of `EraForCausalLM` (seeded: the same on every build)."""
    import torch

    c = config(kind)
    hidden, inter, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"]
    kv_dim = kv * hidden // c["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], hidden), "lm_head.weight": (c["vocab_size"], hidden)}
    norms = ["model.norm"]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, shape in (("q_proj", (hidden, hidden)), ("k_proj", (kv_dim, hidden)), ("v_proj", (kv_dim, hidden)),
                            ("o_proj", (hidden, hidden))):  # fmt: skip
            shapes[f"{p}self_attn.{name}.weight"] = shape
        for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                            ("down_proj", (hidden, inter))):  # fmt: skip
            shapes[f"{p}mlp.{name}.weight"] = shape
        norms += [f"{p}input_layernorm", f"{p}post_attention_layernorm"]
    for norm in norms:
        shapes[f"{norm}.weight"] = (hidden,)
        if kind == "partial":  # LayerNorm: a bias too
            shapes[f"{norm}.bias"] = (hidden,)
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name in sorted(shapes):
        noise = torch.randn(shapes[name], generator=generator)
        weights[name] = 1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.2 * noise
    if fused:  # the same numbers under one qkv_proj: q, k, v stacked along the output dimension
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}.self_attn."
            weights[f"{p}qkv_proj.weight"] = torch.cat([weights.pop(f"{p}{x}_proj.weight") for x in "qkv"])
    return weights


def build(out: Path, kind: str, *, fused: bool = False, einops: bool = False) -> Path:
    """Write the `kind` checkpoint to `out` (created; must not exist): model and config files, weights, tokenizer."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    (out / MODELING).write_text(modeling_source(kind, fused=fused, einops=einops))
    (out / "configuration_era.py").write_text(CONFIGURATION)
    (out / "config.json").write_text(json.dumps(config(kind), indent=2) + "\n")
    save_file(state_dict(kind, fused=fused), str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        shutil.copy(FIXTURE_DIR / name, out / name)
    return out
