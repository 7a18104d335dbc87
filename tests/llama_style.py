"""A 4.4x-era Llama-style remote-code checkpoint "written by others", for the patches' end-to-end tests.

The model file is transformers 4.48.0's own `models/llama/modeling_llama.py`, made remote code the way
such checkpoints were: relative imports made absolute (`from ...x import` -> `from transformers.x import`),
and the configuration taken from the library (`from transformers import LlamaConfig`), so the file runs
on whatever `LlamaConfig` the installed release has. It imports `AttentionMaskConverter` from
`transformers.modeling_attn_mask_utils`, which 5.24.0 removed.

With `rope_theta_read=True` the attention also stores `self.rope_theta = config.rope_theta`, the line
4.40-4.46's Llama attention has (4.48 dropped it): a read of a library config's `rope_theta`, which 5.x
configs keep only in `rope_parameters`.

The weights are random (seeded, so every build is identical), 2 layers, hidden 64, 4 query heads over
2 key/value heads (GQA), untied head, the shipped tokenizer (vocabulary 512). Nothing of transformers is
committed: the file is read from the 4.48.0 env's site-packages (`opensci_patch.matrix.envs.ensure_env`).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

from conftest import FIXTURE_DIR

from opensci_patch.fixtures.own import research_shapes

RELEASE = "4.48.0"
MODELING = "modeling_llama.py"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ROPE_THETA_LINE = "        self.rope_theta = config.rope_theta\n"  # LlamaAttention.__init__ in 4.40-4.46

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "auto_map": {"AutoModelForCausalLM": "modeling_llama.LlamaForCausalLM"},
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 1,
    "hidden_act": "silu",
    "hidden_size": 64,
    "intermediate_size": 128,
    "initializer_range": 0.02,
    "max_position_embeddings": 512,
    "mlp_bias": False,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,  # not the default 10000, so a config that lost it would show in the logits
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": RELEASE,
    "use_cache": True,
    "vocab_size": 512,
}


def upstream_file() -> Path:
    """transformers 4.48.0's Llama modeling file, from the 4.48.0 env (built on first use)."""
    from opensci_patch.matrix.envs import _site_packages, ensure_env

    env = ensure_env(RELEASE, "system", log=lambda *a: None)
    return _site_packages(env.path) / "transformers" / "models" / "llama" / MODELING


def modeling_source(*, rope_theta_read: bool = False) -> str:
    """The 4.48.0 Llama file as remote code: absolute imports, the library's LlamaConfig."""
    text = re.sub(
        r"^from \.\.\.([A-Za-z_][A-Za-z0-9_.]*) import", r"from transformers.\1 import", _upstream_text(), flags=re.M
    )
    text = _replace(text, "from .configuration_llama import LlamaConfig\n", "from transformers import LlamaConfig\n")
    if rope_theta_read:
        anchor = "        self.is_causal = True\n"
        text = _replace(text, anchor, anchor + ROPE_THETA_LINE)
    relative = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ImportFrom) and n.level]
    assert not relative, f"relative imports left: {[ast.unparse(n) for n in relative]}"
    return text


def _upstream_text() -> str:
    return upstream_file().read_text()


def _replace(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"expected one {old!r} in the {RELEASE} Llama file, found {text.count(old)}"
    return text.replace(old, new)


def state_dict(seed: int = 0) -> dict:
    """Random weights with LlamaForCausalLM's names and shapes for CONFIG (seeded: the same on every build)."""
    import torch

    shapes = research_shapes(CONFIG)  # the same Llama names and shapes; this one has an untied lm_head
    shapes["lm_head.weight"] = (CONFIG["vocab_size"], CONFIG["hidden_size"])
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name in sorted(shapes):
        noise = torch.randn(shapes[name], generator=generator)
        # norms near 1; the rest scaled so that 2 layers give logits with a clear (not flat) top token
        weights[name] = 1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.2 * noise
    return weights


# With `vendored=True` the model file is the 4.48.0 file as it is in transformers' tree (`from ...activations import`,
# `from .configuration_llama import LlamaConfig`), next to this configuration module of our own, which gives it the
# library's LlamaConfig through a two-dot import: a vendored copy of the kind relative_imports rewrites.
VENDORED_CONFIGURATION = """\
# The vendored Llama's configuration module: the library's config class, under the name the model file imports.
from ..llama.configuration_llama import LlamaConfig

__all__ = ["LlamaConfig"]
"""


def build(out: Path, *, rope_theta_read: bool = False, vendored: bool = False) -> Path:
    """Write the checkpoint to `out` (created; must not exist): model file, config, weights, tokenizer."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    if vendored:
        (out / MODELING).write_text(_upstream_text())
        (out / "configuration_llama.py").write_text(VENDORED_CONFIGURATION)
    else:
        (out / MODELING).write_text(modeling_source(rope_theta_read=rope_theta_read))
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    save_file(state_dict(), str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        shutil.copy(FIXTURE_DIR / name, out / name)
    return out
