"""Sources and helpers several patch test files share (tests/test_patches.py and tests/test_patch_*.py).

Plain functions, cached per process, not fixtures: each test file wraps what it uses in its own fixture, and the
patched model is built and probed once per process however many files ask for it.
"""

from __future__ import annotations

import ast
import atexit
import difflib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from opensci_patch.rewrite.patches import PATCHES, Patch, apply_patches, by_name

FIXTURE = Path(__file__).resolve().parents[1] / "opensci_patch" / "data" / "opensci-tiny"

# The constructs of a modular-generated model file (transformers 4.54) that the shipped, hand-written
# file does not have: the target of moved_helpers. tests/test_crossversion.py runs a whole such file.
GENERATED = """\
import torch
from torch import nn

from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import auto_docstring, can_return_tuple
from transformers.utils.generic import check_model_inputs


class OsrModel(PreTrainedModel):
    @check_model_inputs
    @auto_docstring
    def forward(self, inputs_embeds=None, attention_mask=None, cache_position=None, past_key_values=None):
        mask_kwargs = {
            "config": self.config,
            "input_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "cache_position": cache_position,
            "past_key_values": past_key_values,
        }
        return create_causal_mask(**mask_kwargs), create_sliding_window_causal_mask(**mask_kwargs)
"""

# A 4.4x-era file built on a library config class, which reads `config.rope_theta`: the target of rope_theta.
LLAMA_STYLE = """\
import torch
from torch import nn


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, config, device=None):
        super().__init__()
        self.rope_theta = config.rope_theta
        dim = config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
"""


# 4.3x-era constructs of issue 29, one per patch (tests/test_era43.py runs a whole such file): rope_scaling
# tested against None, then indexed with a key 5.x's default dict lacks: the target of rope_scaling.
ROPE_SCALING_43 = """\
class Attention:
    def __init__(self, config):
        self.config = config
        if config.rope_scaling is None:
            self.factor = 1.0
        else:
            self.factor = config.rope_scaling["factor"]
        self.rope_scaling = None
"""

# The 4.3x Cache API and tuple indexing of the cache: the target of legacy_cache.
LEGACY_CACHE_43 = """\
from transformers.cache_utils import Cache, DynamicCache


def step(past_key_values, n):
    cache = DynamicCache.from_legacy_cache(past_key_values)
    full = cache.get_max_length() is not None and cache.seen_tokens + n > cache.get_max_length()
    return cache.to_legacy_cache(), full, cache.get_usable_length(n), past_key_values[1][0].shape[2]
"""

# An override passing `standardize_cache_format=` on (TypeError on 4.48+): the target of generation_call.
OVERRIDE_43 = """\
from transformers import GenerationMixin


class ForCausalLM(GenerationMixin):
    def _update_model_kwargs_for_generation(self, outputs, kwargs, flag=False):
        return super()._update_model_kwargs_for_generation(
            outputs, kwargs, standardize_cache_format=flag
        )
"""

# Configuration classes with their own names for the sizes transformers reads: the target of config_aliases.
OWN_NAMES_CONFIG = """\
from transformers import PretrainedConfig


class GlmLikeConfig(PretrainedConfig):
    model_type = "glm_like"

    def __init__(self, num_layers=2, hidden_size=64, **kwargs):
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        super().__init__(**kwargs)


class GptLikeConfig(PretrainedConfig):
    model_type = "gpt_like"
    attribute_map = {"hidden_size": "n_embd"}

    def __init__(self, n_layer=2, n_embd=64, n_head=4, **kwargs):
        self.n_layer = n_layer
        self.n_embd = n_embd
        self.n_head = n_head
        super().__init__(**kwargs)
"""

# `config.max_length` read at build time (5.x configs have none): the target of generation_defaults.
MAX_LENGTH_43 = """\
import torch


class Model(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.limit = config.max_length
        self.generation_config.max_length = 5
        config.num_beams = 1
"""


def fixture_text(text: str) -> str:
    """`text` without blank lines at both ends and without the indentation all its lines share, one newline at the
    end (as LibCST's CodemodTest). Unlike `textwrap.dedent`, a line of only spaces keeps those beyond the margin:
    the patches write some (a blank line moved into a block), and the comparison must see them."""
    lines = text.strip("\n").split("\n")
    margin = min((len(line) - len(line.lstrip(" ")) for line in lines if line.strip()), default=0)
    return "\n".join(line[margin:] for line in lines) + "\n"


def assert_patch(
    patches: Patch | str | Sequence[Patch | str],
    before: str,
    after: str,
    *,
    status: str | dict[str, str] = "applied",
    filename: str = "modeling_x.py",
) -> str:
    """Run one patch (a `Patch` or its name) or, given a sequence, the pipeline of those patches on `before`, and
    compare the WHOLE output with `after` (both dedented, see `fixture_text`): on a mismatch the failure shows a
    unified diff. `status` is every patch's status, or {name: status} for the patches that find their construct
    (the others must be "not-applicable"). A second run on `after` must change nothing ("already-applied" where the
    first run applied, else the same status). Returns the output.
    Write `after` by hand, from what the patch should do: never paste in what it printed."""
    before, after = fixture_text(before), fixture_text(after)
    single = isinstance(patches, (Patch, str))
    chosen = [by_name(p) if isinstance(p, str) else p for p in ([patches] if single else patches)]
    out, statuses = apply_patches(before, chosen, filename)
    if out != after:
        diff = difflib.unified_diff(after.splitlines(True), out.splitlines(True), "expected", "patched")
        raise AssertionError("whole output differs from the expected:\n" + "".join(diff))
    expected = {p.name: status if isinstance(status, str) else status.get(p.name, "not-applicable") for p in chosen}
    assert statuses == expected
    again, statuses = apply_patches(after, chosen, filename)
    assert again == after, "a second run changed the output"
    assert statuses == {name: "already-applied" if s == "applied" else s for name, s in expected.items()}
    return out


@functools.cache
def modeling_source() -> str:
    """The shipped modeling file."""
    return (FIXTURE / "modeling_opensci.py").read_text()


@functools.cache
def patched_source() -> str:
    """The shipped modeling file with every patch applied."""
    return apply_patches(modeling_source(), PATCHES, "modeling_opensci.py")[0]


def function_of(source: str, name: str, **namespace):
    """Compile one top-level function of `source` on its own (the patched file needs transformers to import)."""
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module([node], type_ignores=[]), name, "exec"), namespace)
    return namespace[name]


def class_attribute(source: str, cls: str, attribute: str):
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    assign = next(s for s in node.body if isinstance(s, ast.Assign) and s.targets[0].id == attribute)
    return ast.literal_eval(assign.value)


# --- the patched model under the installed transformers (own process and modules cache) -------------

LOAD_SCRIPT = r"""
import json, shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM

src, weights = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
config = AutoConfig.from_pretrained(src, trust_remote_code=True)
fresh = AutoModelForCausalLM.from_config(config, trust_remote_code=True, attn_implementation="eager").eval()
fresh.save_pretrained(weights)
for f in src.glob("*.py"):
    shutil.copy(f, weights)
ids = torch.tensor([[5, 17, 42, 99, 3, 7, 11]])
dim = config.head_dim
expected = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
out = {}
with torch.no_grad():
    reference = fresh(ids).logits
    model = AutoModelForCausalLM.from_pretrained(weights, trust_remote_code=True, attn_implementation="eager").eval()
    rotary = model.model.rotary_emb
    out["inv_freq_after_load"] = torch.equal(rotary.inv_freq, expected)
    out["logits_equal"] = torch.equal(model(ids).logits, reference)
    out["tied"] = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    bad = {"zeros": torch.zeros_like(expected), "garbage": torch.full_like(expected, 8192.0),
           "bf16": expected.to(torch.bfloat16)}
    for name, value in bad.items():
        if value.dtype == rotary.inv_freq.dtype:
            rotary.inv_freq.copy_(value)  # in place, as uninitialised memory would be
        else:
            rotary.register_buffer("inv_freq", value, persistent=False)  # as model.to(bfloat16) does
        logits = model(ids).logits
        out[name] = rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, expected)
        out[name + "_logits_equal"] = torch.equal(logits, reference)
    real_equal, compared = torch.equal, []
    torch.equal = lambda *a: compared.append(1) or real_equal(*a)
    for _ in range(3):
        model(ids)
    out["comparisons_when_unchanged"] = len(compared)
    rotary.inv_freq.data = torch.full_like(expected, 8192.0)  # new storage, same tensor object
    out["data_swap_logits_equal"] = torch.equal(model(ids).logits, reference)
    out["comparisons_after_data_swap"] = len(compared)
    torch.equal = real_equal
    with torch.inference_mode():
        rotary.register_buffer("inv_freq", torch.zeros_like(expected), persistent=False)
        out["inference_mode_logits_equal"] = torch.equal(model(ids).logits, reference)
        rotary.inv_freq.zero_()  # an inference tensor: no version counter, so compared every time
        out["inference_mode_inplace_logits_equal"] = torch.equal(model(ids).logits, reference)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda *a, **k: calls.append(sorted(k)) or real(*a, **k)
    sdpa = AutoModelForCausalLM.from_pretrained(weights, trust_remote_code=True, attn_implementation="sdpa").eval()
    out["sdpa_max_diff"] = float((sdpa(ids).logits - reference).abs().max())
    torch.nn.functional.scaled_dot_product_attention = real
    out["sdpa_calls"] = len(calls)
    out["sdpa_kwargs"] = sorted({k for call in calls for k in call})
    out["loss_finite"] = bool(torch.isfinite(model(ids, labels=ids).loss))
print(json.dumps(out))
"""


@functools.cache
def loaded_model() -> dict:
    """Build a model from the patched code, save it, load it back with from_pretrained, and probe it."""
    tmp = Path(tempfile.mkdtemp(prefix="opensci-patched-model-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    src = tmp / "opensci-patched"
    src.mkdir()
    shutil.copy(FIXTURE / "config.json", src)
    shutil.copy(FIXTURE / "configuration_opensci.py", src)
    (src / "modeling_opensci.py").write_text(patched_source())
    (tmp / "probe.py").write_text(LOAD_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHONPATH", "TRANSFORMERS_"))}
    env.update(HF_MODULES_CACHE=str(tmp / "modules"), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run(
        [sys.executable, str(tmp / "probe.py"), str(src), str(tmp / "weights")],
        cwd=tmp,  # not the repo: the patched code must not need opensci_patch
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["warnings"] = proc.stderr.count("opensci-patch: the rotary inv_freq buffer")
    return result


# Others' remote code of the 4.53-4.57 era (issue 19), each construct in a file of our own.
# A model class whose __init__ never calls post_init, on the library's LlamaConfig (post_init, remote_code).
NO_POST_INIT = """\
import torch
from torch import nn

from transformers import LlamaConfig
from transformers.modeling_utils import PreTrainedModel


class ResearchPreTrainedModel(PreTrainedModel):
    config_class = LlamaConfig


class ResearchModel(ResearchPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.post_init()


class ResearchForCausalLM(ResearchPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = ResearchModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
"""

# A modular-generated forward with PEP 604 annotations (union_annotations).
PEP604 = """\
from typing import Optional

import torch

from transformers.modeling_utils import PreTrainedModel
from transformers.utils import auto_docstring


class ResearchForCausalLM(PreTrainedModel):
    @auto_docstring
    def forward(self, input_ids: Optional[torch.LongTensor] = None, logits_to_keep: int | torch.Tensor = 0):
        return input_ids
"""

# Issue 25. A config class as the modular converter unrolls one on Qwen3Config: the modular's signature names the
# token ids, the unrolled body never stores them and passes only tie_word_embeddings on (config_params).
CONVERTED_CONFIG = """\
from transformers.configuration_utils import PretrainedConfig


class OsrConfig(PretrainedConfig):
    model_type = "osr"

    def __init__(
        self,
        vocab_size=512,
        hidden_size=96,
        tie_word_embeddings=True,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
"""

# A modeling file vendored from transformers' tree: package-relative imports (relative_imports).
VENDORED = """\
import torch
from torch import nn

from ...activations import ACT2FN
from ...modeling_utils import PreTrainedModel
from ..llama.modeling_llama import LlamaRMSNorm
from .configuration_osr import OsrConfig


class OsrMLP(nn.Module):
    def __init__(self, config: OsrConfig):
        super().__init__()
        self.act_fn = ACT2FN[config.hidden_act]
        self.norm = LlamaRMSNorm(config.hidden_size)
"""
