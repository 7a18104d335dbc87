"""moved_helpers and `transformers.modeling_attn_mask_utils`, which transformers 5.24 removed; rope_theta's reads.

Each imported name gets its own guard whose stand-in is 5.23.0's code, used only where the module is gone.
The end-to-end proof is a 4.4x-era Llama-style remote-code checkpoint written by others (tests/llama_style.py:
transformers 4.48.0's own Llama file): unpatched it fails on 5.24.0; hotfixed it loads on 4.48.0, 5.2.0 and
5.24.0 and gives the logits and greedy ids of the unpatched file on 4.48.0, bit for bit.
"""

from __future__ import annotations

import ast
import re
import sys
import types

import llama_style
import pytest
from patch_sources import assert_patch

from opensci_patch._util.errors import PatchError
from opensci_patch.rewrite.patches import by_name, default_patches

PATCH = by_name("moved_helpers")
NAMES = (
    "AttentionMaskConverter",
    "_prepare_4d_causal_attention_mask",
    "_prepare_4d_causal_attention_mask_for_sdpa",
    "_prepare_4d_attention_mask",
    "_prepare_4d_attention_mask_for_sdpa",
    "_create_4d_causal_attention_mask",
)
# what a 4.3x/4.4x-era file imports: every name 5.23's module has, one import line, next to a helper of another module
EVERY_NAME = f"""\
import torch
from torch import nn

from transformers.modeling_attn_mask_utils import (
    {", ".join(NAMES)},
)
from transformers.modeling_utils import PreTrainedModel


class Model(PreTrainedModel):
    def forward(self, attention_mask, inputs_embeds):
        converter = AttentionMaskConverter(is_causal=True)
        return converter, _prepare_4d_causal_attention_mask(attention_mask, inputs_embeds.shape[:2], inputs_embeds, 0)
"""


@pytest.fixture(scope="module")
def patched() -> str:
    return PATCH.apply(EVERY_NAME, "modeling_x.py").source


def _namespace(source: str) -> dict:
    """Execute a patched source under the installed transformers (5.24: the module is gone); without this test
    module's `from __future__ import annotations`, which a model file does not have."""
    namespace: dict = {"__name__": "patched_under_test"}
    exec(compile(source, "modeling_x.py", "exec", dont_inherit=True), namespace)
    return namespace


# --- the patch's contract on these imports ------------------------------------------------------------


def test_each_name_gets_its_own_guard_with_a_stand_in(patched: str):
    tree = ast.parse(patched)
    guards = [n for n in tree.body if isinstance(n, ast.Try)]
    assert [ast.unparse(g.body[0]) for g in guards] == [
        f"from transformers.modeling_attn_mask_utils import {name}" for name in NAMES
    ]
    for guard, name in zip(guards, NAMES, strict=True):
        assert [ast.unparse(h.type) for h in guard.handlers] == ["ImportError"]
        defined = {n.name for n in guard.handlers[0].body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert name in defined
    assert "from transformers.modeling_utils import PreTrainedModel" in patched  # the other import is kept
    assert patched.count("# opensci-patch: moved_helpers") == 1  # one marker above the guards


def test_second_application_is_already_applied_with_identical_text(patched: str):
    again = PATCH.apply(patched, "modeling_x.py")
    assert again.status == "already-applied" and again.source == patched


def test_stand_ins_are_used_only_where_the_module_is_gone(patched: str, monkeypatch):
    real = types.ModuleType("transformers.modeling_attn_mask_utils")
    for name in NAMES:
        setattr(real, name, object())
    monkeypatch.setitem(sys.modules, "transformers.modeling_attn_mask_utils", real)
    namespace = _namespace(patched)
    assert all(namespace[name] is getattr(real, name) for name in NAMES)
    monkeypatch.setitem(sys.modules, "transformers.modeling_attn_mask_utils", None)  # import raises ImportError
    namespace = _namespace(patched)
    assert all(namespace[name] is not getattr(real, name) for name in NAMES)
    assert "Stand-in (opensci-patch)" in namespace["AttentionMaskConverter"].__doc__


@pytest.mark.parametrize(
    ("old", "new", "why"),
    [
        ("import (\n", "import (\n    DEPRECATION_MESSAGE,\n", "DEPRECATION_MESSAGE, which has no stand-in"),
        ("AttentionMaskConverter,", "AttentionMaskConverter as AMC,", "renames the import"),
        (f"import (\n    {', '.join(NAMES)},\n)", "import *", "every name of a module"),
        (
            f"from transformers.modeling_attn_mask_utils import (\n    {', '.join(NAMES)},\n)",
            "import transformers.modeling_attn_mask_utils",
            "removed as a whole",
        ),
        (
            f"from transformers.modeling_attn_mask_utils import (\n    {', '.join(NAMES)},\n)",
            "from transformers import modeling_attn_mask_utils",
            "removed as a whole",
        ),
        (
            "        converter = AttentionMaskConverter(is_causal=True)\n",
            "        from transformers.modeling_attn_mask_utils import AttentionMaskConverter\n\n"
            "        converter = AttentionMaskConverter(is_causal=True)\n",
            "not a top-level import",
        ),
    ],
)
def test_refuses_what_it_cannot_guard_naming_patch_and_file(old: str, new: str, why: str):
    assert EVERY_NAME.count(old) == 1
    with pytest.raises(
        PatchError, match=rf"(?s)patch 'moved_helpers' cannot rewrite modeling_x\.py: .*{re.escape(why)}"
    ):
        PATCH.apply(EVERY_NAME.replace(old, new), "modeling_x.py")


# --- the stand-ins compute 5.23's masks -----------------------------------------------------------------


@pytest.fixture(scope="module")
def stand_ins(patched: str) -> dict:
    torch = pytest.importorskip("torch")
    namespace = {"torch": torch}
    for guard in (n for n in ast.parse(patched).body if isinstance(n, ast.Try)):
        exec(
            compile(ast.Module(guard.handlers[0].body, type_ignores=[]), "stand-in", "exec", dont_inherit=True),
            namespace,
        )
    return namespace


def test_causal_stand_ins_give_min_above_the_diagonal_and_at_padding(stand_ins: dict):
    """Expected values from the definition (0 where a query may attend, dtype-min elsewhere), not from the code."""
    torch = pytest.importorskip("torch")
    embeds = torch.zeros(2, 3, 4)
    low = torch.finfo(torch.float32).min
    causal = torch.triu(torch.full((3, 3), low), diagonal=1)
    mask = stand_ins["_prepare_4d_causal_attention_mask"](None, (2, 3), embeds, 0)
    assert mask.shape == (2, 1, 3, 3) and torch.equal(mask[0, 0], causal) and torch.equal(mask[1, 0], causal)
    padded = torch.tensor([[1, 1, 1], [0, 1, 1]])
    mask = stand_ins["_prepare_4d_causal_attention_mask"](padded, (2, 3), embeds, 0)
    assert torch.equal(mask[0, 0], causal)
    assert torch.equal(mask[1, 0, :, 0], torch.full((3,), low)) and torch.equal(mask[1, 0, :, 1:], causal[:, 1:])
    assert stand_ins["_prepare_4d_causal_attention_mask_for_sdpa"](None, (2, 3), embeds, 0) is None  # is_causal
    assert torch.equal(stand_ins["_prepare_4d_causal_attention_mask_for_sdpa"](padded, (2, 3), embeds, 0), mask)
    with_past = stand_ins["_create_4d_causal_attention_mask"]((1, 2), torch.float32, "cpu", past_key_values_length=3)
    assert torch.equal(with_past[0, 0], torch.triu(torch.full((2, 5), low), diagonal=4))
    # 5.23's sliding window: a query sees itself and `sliding_window` keys back (`tril(diagonal=-window - 1)` masked)
    window = stand_ins["AttentionMaskConverter"](is_causal=True, sliding_window=2).to_causal_4d(1, 4, 4, torch.float32)
    assert torch.equal(window[0, 0] == 0, torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]).bool())


def test_padding_stand_ins_give_min_at_padding_only(stand_ins: dict):
    torch = pytest.importorskip("torch")
    low = torch.finfo(torch.float32).min
    padded = torch.tensor([[0, 1, 1]])
    expected = torch.tensor([low, 0.0, 0.0]).expand(1, 1, 2, 3)
    assert torch.equal(stand_ins["_prepare_4d_attention_mask"](padded, torch.float32, tgt_len=2), expected)
    assert torch.equal(stand_ins["_prepare_4d_attention_mask_for_sdpa"](padded, torch.float32, tgt_len=2), expected)
    assert stand_ins["_prepare_4d_attention_mask_for_sdpa"](torch.ones(1, 3), torch.float32) is None
    with pytest.raises(ValueError, match="strictly positive integer, not `0`"):
        stand_ins["AttentionMaskConverter"](is_causal=True, sliding_window=0)


@pytest.mark.crossversion
def test_stand_ins_equal_5_23s_module_bit_for_bit(stand_ins: dict):
    """5.23.0's modeling_attn_mask_utils.py (from its env), run under the installed transformers, against the
    stand-ins: the same tensors, the same decisions, the same errors."""
    torch = pytest.importorskip("torch")
    from opensci_patch.matrix.envs import _site_packages, ensure_env

    env = ensure_env("5.23.0", "system", log=lambda *a: None)
    text = (_site_packages(env.path) / "transformers" / "modeling_attn_mask_utils.py").read_text()
    text = text.replace("from .utils.import_utils import", "from transformers.utils.import_utils import")
    reference: dict = {}
    with pytest.warns(FutureWarning):  # 5.23 warns that the module is deprecated; the stand-ins do not
        exec(compile(text, "modeling_attn_mask_utils_5_23.py", "exec", dont_inherit=True), reference)
        _compare(reference, stand_ins, torch)


def _compare(reference: dict, stand_ins: dict, torch) -> None:
    generator = torch.Generator().manual_seed(0)
    pad_left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        embeds = torch.randn(2, 5, 8, generator=generator).to(dtype)
        cases = [
            ("_prepare_4d_causal_attention_mask", (None, (2, 5), embeds, 0)),
            ("_prepare_4d_causal_attention_mask", (pad_left, (2, 5), embeds, 0)),
            ("_prepare_4d_causal_attention_mask", (pad_left, (2, 2), embeds[:, :2], 3)),
            ("_prepare_4d_causal_attention_mask", (pad_left, (2, 5), embeds, 0, 3)),
            (
                "_prepare_4d_causal_attention_mask",
                (pad_left[:, None, None, :].expand(2, 1, 5, 5).to(dtype), (2, 5), embeds, 0),
            ),
            ("_prepare_4d_causal_attention_mask_for_sdpa", (None, (2, 5), embeds, 0)),
            ("_prepare_4d_causal_attention_mask_for_sdpa", (None, (2, 2), embeds[:, :2], 3)),
            ("_prepare_4d_causal_attention_mask_for_sdpa", (torch.ones(2, 5), (2, 5), embeds, 0)),
            ("_prepare_4d_causal_attention_mask_for_sdpa", (pad_left, (2, 5), embeds, 0)),
            ("_prepare_4d_causal_attention_mask_for_sdpa", (pad_left, (2, 5), embeds, 0, 2)),
            ("_prepare_4d_attention_mask", (pad_left, dtype, 3)),
            ("_prepare_4d_attention_mask_for_sdpa", (pad_left, dtype)),
            ("_prepare_4d_attention_mask_for_sdpa", (torch.ones(2, 5), dtype)),
            ("_create_4d_causal_attention_mask", ((2, 3), dtype, "cpu", 2)),
            ("_create_4d_causal_attention_mask", ((2, 3), dtype, "cpu", 2, 2)),
        ]
        for name, args in cases:
            _same(reference[name](*args), stand_ins[name](*args), f"{name} {dtype}")
        converters = [module["AttentionMaskConverter"] for module in (reference, stand_ins)]
        for kwargs in ({"is_causal": True}, {"is_causal": True, "sliding_window": 3}):
            ours, theirs = (c(**kwargs) for c in converters[::-1])
            assert repr(ours) == repr(theirs)  # the same dataclass fields and values
            _same(theirs.to_causal_4d(2, 4, 6, dtype), ours.to_causal_4d(2, 4, 6, dtype), f"to_causal_4d {kwargs}")
            _same(theirs.to_4d(pad_left, 5, dtype, 5), ours.to_4d(pad_left, 5, dtype, 5), f"to_4d {kwargs}")
        float_mask = reference["_prepare_4d_causal_attention_mask"](pad_left, (2, 5), embeds, 0)
        low = torch.finfo(dtype).min
        _same(*(c._unmask_unattended(float_mask, low) for c in converters), "_unmask_unattended")
        for args in ((None, embeds, 0), (pad_left, embeds, 0), (torch.ones(2, 5), embeds, 0), (None, embeds, 3, 4)):
            assert converters[0]._ignore_causal_mask_sdpa(*args) == converters[1]._ignore_causal_mask_sdpa(*args)
    for bad in ({"is_causal": True, "sliding_window": -1},):
        messages = []
        for converter in converters:
            with pytest.raises(ValueError) as info:
                converter(**bad)
            messages.append(str(info.value))
        assert messages[0] == messages[1]


def _same(expected, actual, what: str) -> None:
    import torch

    if expected is None or actual is None:
        assert expected is None and actual is None, what
        return
    assert expected.dtype == actual.dtype and expected.shape == actual.shape, what
    assert torch.equal(expected, actual), what


# --- end to end: a 4.4x-era Llama-style remote-code checkpoint written by others ------------------------

BASELINE = "4.48.0"
RELEASES = ["4.48.0", "5.2.0", "5.24.0"]
# Not 5.2.0 with SDPA under `capture`: 5.2's own `_ignore_causal_mask_sdpa` logs
# `logger.warning_once(DEPRECATION_MESSAGE, FutureWarning)`, a %-format with an argument and no placeholder, and
# capture's log collector formats every record unguarded, so the TypeError ends the forward. (Outside capture the
# logging module reports it on stderr and the forward goes on: the same logits as 4.48.0, measured.)
SDPA_RELEASES = ["4.48.0", "5.2.0", "5.24.0"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    from opensci_patch.rewrite.hotfix import hotfix

    root = tmp_path_factory.mktemp("llama-style")
    plain = llama_style.build(root / "llama-448")
    reads = llama_style.build(root / "llama-448-rope-theta", rope_theta_read=True)
    out = {"plain": plain, "reads": reads}
    for kind in ("plain", "reads"):
        result = hotfix(out[kind], root / f"{out[kind].name}_fixed", log=lambda *a: None)
        out[f"{kind}_fixed"], out[f"{kind}_summary"] = result.dst, result.summary
    without = [p.name for p in default_patches() if p.name != "rope_theta"]
    out["reads_no_rope_theta"] = hotfix(reads, root / "no-rope-theta", only=without, log=lambda *a: None).dst
    return out


@pytest.fixture(scope="module")
def baseline(checkpoints, tmp_path_factory) -> dict:
    """The unpatched file on 4.48.0, the release it was written for: what every hotfixed run must reproduce."""
    from test_crossversion import capture

    out = tmp_path_factory.mktemp("baseline")
    records = {}
    for attn in ("eager", "sdpa"):
        rc, rec = capture(BASELINE, checkpoints["plain"], out / f"{attn}.json", "--attn", attn, "--reference", "off")
        assert rc == 0, rec.get("error")
        assert len(rec["generation"]["ids"]) == 20
        records[attn] = rec
    assert records["eager"]["logits_sha256"] != records["sdpa"]["logits_sha256"]  # the two are told apart
    return records


@pytest.mark.crossversion
def test_every_default_patch_applies_to_the_llama_file(checkpoints):
    # no PEP 604 annotations, no @auto_docstring, absolute imports, no config class, none of issue 29's 4.3x
    # constructs (4.48's file reads the cache through get_seq_length and rope_scaling through .get), and
    # LlamaForCausalLM.__init__ calls post_init already
    absent = {"union_annotations", "auto_docstring_args", "relative_imports", "config_params", "legacy_cache",
              "generation_call", "config_aliases", "rope_scaling", "generation_defaults"}  # fmt: skip
    expected = {
        p.name: "not-applicable" if p.name in absent else "already-applied" if p.name == "post_init" else "applied"
        for p in default_patches()
    }
    assert checkpoints["reads_summary"] == expected
    # 4.48's own file no longer reads config.rope_theta (4.40-4.46's attention did)
    assert checkpoints["plain_summary"] == expected | {"rope_theta": "not-applicable"}


@pytest.mark.crossversion
def test_unpatched_llama_file_fails_on_5_24_for_the_removed_module(checkpoints, tmp_path):
    from test_crossversion import capture

    rc, rec = capture("5.24.0", checkpoints["plain"], tmp_path / "unpatched.json", "--reference", "off")
    assert rc == 1 and rec["status"] == "load-error"
    assert rec["error"]["type"] == "MissingLibraryModule"  # the import error, named as such (capture)
    assert "transformers.modeling_attn_mask_utils" in rec["error"]["message"]
    assert "removed in transformers 5.24.0" in rec["error"]["message"]


@pytest.mark.crossversion
def test_without_rope_theta_the_rope_theta_read_fails_on_5_24(checkpoints, tmp_path):
    from test_crossversion import capture

    rc, rec = capture(
        "5.24.0", checkpoints["reads_no_rope_theta"], tmp_path / "no-rope-theta.json", "--reference", "off"
    )
    assert rc == 1 and rec["status"] == "load-error"
    assert rec["error"]["type"] == "AttributeError" and "rope_theta" in rec["error"]["message"]


@pytest.mark.crossversion
@pytest.mark.parametrize("version", RELEASES)
def test_hotfixed_llama_file_gives_4_48s_logits_and_greedy_ids(checkpoints, baseline, version, tmp_path):
    from test_crossversion import capture

    # the file reading rope_theta everywhere; 4.48's own (no read) where the module is gone, eager
    runs = [("reads", "eager")] + ([("reads", "sdpa")] if version in SDPA_RELEASES else [])
    runs += [("plain", "eager")] if version == "5.24.0" else []
    for kind, attn in runs:
        out = tmp_path / f"{kind}-{attn}.json"
        rc, rec = capture(version, checkpoints[f"{kind}_fixed"], out, "--attn", attn, "--reference", "off")
        assert rc == 0, rec.get("error")
        assert rec["model"]["patched"] is True
        assert rec["logits_sha256"] == baseline[attn]["logits_sha256"], (kind, attn)
        assert rec["generation"]["ids"] == baseline[attn]["generation"]["ids"], (kind, attn)


WHOLE_BEFORE = """\
import torch
from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask

X = 1
"""


def _whole_after() -> str:
    # hand-written but for the stand-in under `except ImportError:` (5.23.0's code; compared with it bit for bit above)
    import textwrap

    from opensci_patch.rewrite.patches.stand_ins import STAND_INS

    lines = STAND_INS["_prepare_4d_attention_mask"].strip("\n").split("\n")
    # indented into the handler; a blank line between two top-level statements of the stand-in is written with the
    # handler's indentation (how libcst renders a module's blank lines moved into a block), one inside them empty;
    # a docstring's continuation line is string content, not indented
    top_blank = {i for i, line in enumerate(lines) if not line and next(s for s in lines[i:] if s)[0] != " "}
    stand_in = "\n".join("    " if i in top_blank else textwrap.indent(line, "    ") for i, line in enumerate(lines))
    stand_in = stand_in.replace("        capture; for a tensor", "    capture; for a tensor")
    return f"""\
import torch
# opensci-patch: moved_helpers (a generated file's helper, missing or moved in some transformers release)
try:
    from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask
except ImportError:
{stand_in}

X = 1
"""


def test_whole_output_the_import_is_guarded_in_place_with_its_stand_in():
    assert_patch("moved_helpers", WHOLE_BEFORE, _whole_after())
