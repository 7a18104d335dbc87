"""tied_weights on transformers 5.3.0: the override that keeps a remote-code model's tie.

5.3.0's `PreTrainedModel.mark_tied_weights_as_initialized` flags the tied targets `_is_hf_initialized`
and then, for remote code only, drops every flagged key from `loading_info.missing_keys`, the tied
targets included; `tie_weights` then takes `lm_head.weight` for loaded, does not tie it, and it stays
on the meta device. The patch adds an override to the class that declares the tied keys. These tests
check the rewrite (applies, verifies, idempotent, upgrades the previous patch's output, refuses
what it cannot vouch for), the override against a stand-in with 5.3.0's logic, and, across releases,
the hotfixed shipped model on a real 5.3.0.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import libcst as cst
import pytest
from conftest import FIXTURE_DIR
from patch_sources import assert_patch, class_attribute

from opensci_patch._util.errors import PatchError
from opensci_patch.rewrite.patches import State, by_name
from opensci_patch.rewrite.patches import tied_weights as tw
from opensci_patch.rewrite.patches.syntax import method

PATCH = by_name("tied_weights")
GUARD_MARKER = "# opensci-patch: tied_weights (transformers 5.3.0"

# A generated-style class: a list of tied keys, no embedding accessors.
TIED = """\
import torch
from torch import nn


class OsrModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 4)


class OsrForCausalLM(nn.Module):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config):
        super().__init__()
        self.model = OsrModel(config)
        self.lm_head = nn.Linear(4, 10, bias=False)
"""

# What the previous version of the patch (commit d900d94) wrote for TIED: dict and accessors, no override.
PREVIOUS_OUTPUT = """\
import torch
from torch import nn


class OsrModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 4)


class OsrForCausalLM(nn.Module):
    # opensci-patch: tied_weights (transformers 5.x needs {target: source})
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__()
        self.model = OsrModel(config)
        self.lm_head = nn.Linear(4, 10, bias=False)

    # opensci-patch: tied_weights (transformers < 4.54 ties lm_head through these accessors)
    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings
"""


def _inspect(source: str) -> State:
    return tw.inspect(cst.parse_module(source))


def _guard_count(source: str) -> int:
    return source.count("def mark_tied_weights_as_initialized(")


# --- the rewrite -------------------------------------------------------------------------------------


def test_applies_adds_the_override_once_and_is_idempotent():
    outcome = PATCH.apply(TIED, "modeling_osr.py")
    assert outcome.status == "applied"
    assert _guard_count(outcome.source) == 1
    assert GUARD_MARKER in outcome.source
    assert _inspect(outcome.source) is State.DONE
    again = PATCH.apply(outcome.source, "modeling_osr.py")
    assert again.status == "already-applied" and again.source == outcome.source


def test_the_shipped_file_gets_the_override_on_the_class_that_ties():
    source = (FIXTURE_DIR / "modeling_opensci.py").read_text()
    patched = PATCH.apply(source, "modeling_opensci.py").source
    module = cst.parse_module(patched)
    owners = [
        cls.name.value
        for cls in module.body
        if isinstance(cls, cst.ClassDef) and method(cls, "mark_tied_weights_as_initialized") is not None
    ]
    assert owners == ["OpensciForCausalLM"]


def test_upgrades_the_previous_patch_output_to_what_a_fresh_patch_writes():
    assert _inspect(PREVIOUS_OUTPUT) is State.NEEDED
    upgraded = PATCH.apply(PREVIOUS_OUTPUT, "modeling_osr.py")
    assert upgraded.status == "applied"
    assert upgraded.source.startswith(PREVIOUS_OUTPUT)  # only appended to
    assert upgraded.source == PATCH.apply(TIED, "modeling_osr.py").source


def test_an_empty_tie_gets_no_override():
    outcome = PATCH.apply(TIED.replace('["lm_head.weight"]', "[]"), "modeling_osr.py")
    assert outcome.status == "applied"
    assert "_tied_weights_keys = {}" in outcome.source
    assert _guard_count(outcome.source) == 0


def test_a_reformatted_override_still_counts_as_done():
    """Layout, comments and docstring wording are not what the check compares."""
    patched = PATCH.apply(TIED).source
    reworded = patched.replace("so that `tie_weights` ties them.", "(reworded).").replace(
        "        super().mark_tied_weights_as_initialized(*args, **kwargs)\n",
        "        super().mark_tied_weights_as_initialized(  # upstream first\n            *args, **kwargs\n        )\n",
    )
    assert reworded != patched
    assert PATCH.apply(reworded).status == "already-applied"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # the inserted override edited so that it no longer puts the keys back
        (
            "            loading_info.missing_keys = set(loading_info.missing_keys) | missing_tied\n",
            "            pass\n",
        ),
        # a different override of the same name, written by the model's authors
        (
            '        loading_info = args[0] if args else kwargs.get("loading_info")\n',
            "        return None\n        loading_info = None\n",
        ),
    ],
)
def test_refuses_an_override_it_did_not_write(old: str, new: str):
    patched = PATCH.apply(TIED).source
    assert old in patched
    mangled = patched.replace(old, new)
    with pytest.raises(PatchError, match="defines its own mark_tied_weights_as_initialized"):
        PATCH.apply(mangled, "modeling_osr.py")
    # also when the list is still there: the rewrite would not verify
    with pytest.raises(PatchError, match="mark_tied_weights_as_initialized"):
        PATCH.apply(mangled.replace('{"lm_head.weight": "model.embed_tokens.weight"}', '["lm_head.weight"]'))


def test_refuses_a_tie_it_cannot_read():
    with pytest.raises(PatchError, match="neither a list of names nor a dict"):
        PATCH.apply(TIED.replace('["lm_head.weight"]', "tied_keys()"), "modeling_osr.py")


# --- the override, against stand-ins for the upstream method ----------------------------------------

UPSTREAM = '''
class Upstream53(torch.nn.Module):
    """transformers 5.3.0's PreTrainedModel.mark_tied_weights_as_initialized, for a remote-code class."""

    def mark_tied_weights_as_initialized(self, loading_info):
        for name in self.all_tied_weights_keys:
            self.get_parameter(name)._is_hf_initialized = True
        loading_info.missing_keys = {
            key for key in loading_info.missing_keys
            if not getattr(self.get_parameter(key), "_is_hf_initialized", False)
        }


class Upstream52(torch.nn.Module):
    """5.0 - 5.2: no argument, missing keys untouched."""

    def mark_tied_weights_as_initialized(self):
        for name in self.all_tied_weights_keys:
            self.get_parameter(name)._is_hf_initialized = True
'''


def _model(source: str, base: str):
    """An OsrForCausalLM of `source` whose base class is the stand-in `base`, tied as 5.x records it."""
    pytest.importorskip("torch")
    namespace: dict = {}
    text = source.replace("import torch\n", "import torch\n" + UPSTREAM, 1)
    exec(
        compile(text.replace("class OsrForCausalLM(nn.Module)", f"class OsrForCausalLM({base})"), "m", "exec"),
        namespace,
    )
    model = namespace["OsrForCausalLM"](None)
    model.all_tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    return model


@pytest.mark.parametrize(("source", "kept"), [(PREVIOUS_OUTPUT, set()), ("patched", {"lm_head.weight"})])
def test_the_override_keeps_the_missing_tied_key_on_5_3(source: str, kept: set[str]):
    """Without the override the stand-in drops lm_head.weight (the bug); with it the key stays missing,
    while a flagged key that is not tied (module tying, what upstream means to drop) is still dropped."""
    model = _model(PATCH.apply(TIED).source if source == "patched" else source, "Upstream53")
    model.model.embed_tokens.weight._is_hf_initialized = True  # loaded through a shared module
    info = type("LoadStateDictInfo", (), {})()
    info.missing_keys = {"lm_head.weight", "model.embed_tokens.weight"}
    model.mark_tied_weights_as_initialized(info)
    assert info.missing_keys == kept
    assert model.lm_head.weight._is_hf_initialized is True  # upstream's flagging still happened


def test_the_override_passes_through_the_argumentless_5_2_call():
    model = _model(PATCH.apply(TIED).source, "Upstream52")
    model.mark_tied_weights_as_initialized()
    assert model.lm_head.weight._is_hf_initialized is True


# --- on a real transformers 5.3.0 ------------------------------------------------------------------

TIE_PROBE = """
import json, sys
from opensci_patch.measure.isolation import isolated_hf_cache
with isolated_hf_cache():
    import transformers
    from transformers import AutoModelForCausalLM
    out = {"transformers": transformers.__version__}
    for name in sys.argv[1:]:
        m = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True)
        out[name] = {"tied": m.lm_head.weight is m.model.embed_tokens.weight,
                     "device": str(m.lm_head.weight.device), "all_tied": m.all_tied_weights_keys}
    print(json.dumps(out))
"""


class _DropGuard(cst.CSTTransformer):
    """The previous patch's output: the hotfixed file without the override."""

    def leave_FunctionDef(self, original, updated):
        if updated.name.value == "mark_tied_weights_as_initialized":
            return cst.RemovalSentinel.REMOVE
        return updated


@pytest.mark.crossversion
def test_hotfixed_shipped_model_is_tied_on_5_3_and_gives_the_4_48_logits(tmp_path: Path):
    from test_crossversion import capture

    from opensci_patch.matrix.envs import ensure_env, run_python
    from opensci_patch.rewrite.hotfix import hotfix

    shutil.copytree(FIXTURE_DIR, tmp_path / "opensci-tiny")
    fixed = hotfix(tmp_path / "opensci-tiny", tmp_path / "opensci-tiny_fixed", log=lambda *a: None).dst
    previous = tmp_path / "opensci-tiny_previous"
    shutil.copytree(fixed, previous)
    modeling = previous / "modeling_opensci.py"
    modeling.write_text(cst.parse_module(modeling.read_text()).visit(_DropGuard()).code)

    env = ensure_env("5.3.0", "system", log=lambda *a: None)
    proc = run_python(env, ["-c", TIE_PROBE, str(fixed), str(previous)], timeout=600)
    assert proc.returncode == 0, proc.stderr
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["transformers"] == "5.3.0"
    assert probe[str(fixed)] == {
        "tied": True,
        "device": "cpu",
        "all_tied": {"lm_head.weight": "model.embed_tokens.weight"},
    }
    # the failure the override exists for, on the same release: without it the head is left on meta
    assert probe[str(previous)] == {"tied": False, "device": "meta", "all_tied": {}}

    _, old = capture("4.48.0", fixed, tmp_path / "4.48.0.json")
    rc, new = capture("5.3.0", fixed, tmp_path / "5.3.0.json")
    assert rc == 0, new.get("error")
    assert new["target"]["token"] == old["target"]["token"] == " Paris"
    assert new["target"]["logit"] == old["target"]["logit"]
    assert new["logits_sha256"] == old["logits_sha256"]
    assert new["generation"]["ids"] == old["generation"]["ids"]


# --- the tied keys as a dict, and the embedding accessors transformers < 4.54 ties through ----------------


def test_tied_weights_become_a_dict_derived_from_the_code(patched_source: str):
    assert class_attribute(patched_source, "OpensciForCausalLM", "_tied_weights_keys") == {
        "lm_head.weight": "model.embed_tokens.weight"
    }


def test_tied_weights_adds_the_accessors_a_generated_file_lacks():
    torch = pytest.importorskip("torch")
    outcome = by_name("tied_weights").apply(TIED, "modeling_osr.py")
    assert outcome.status == "applied"
    assert by_name("tied_weights").apply(outcome.source).status == "already-applied"
    namespace: dict = {}
    exec(compile(outcome.source, "modeling_osr.py", "exec"), namespace)
    lm = namespace["OsrForCausalLM"](None)
    assert lm.get_input_embeddings() is lm.model.embed_tokens
    assert lm.get_output_embeddings() is lm.lm_head
    other = torch.nn.Embedding(10, 4)
    lm.set_input_embeddings(other)
    lm.set_output_embeddings(torch.nn.Identity())
    assert lm.model.embed_tokens is other and isinstance(lm.lm_head, torch.nn.Identity)
    assert namespace["OsrForCausalLM"]._tied_weights_keys == {"lm_head.weight": "model.embed_tokens.weight"}


def test_tied_weights_keeps_accessors_the_class_defines(modeling_source: str):
    own = TIED + "\n    def get_output_embeddings(self):\n        return None\n"
    patched = by_name("tied_weights").apply(own).source
    tree = ast.parse(patched)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "OsrForCausalLM")
    names = [n.name for n in cls.body if isinstance(n, ast.FunctionDef)]
    assert names.count("get_output_embeddings") == 1 and "get_input_embeddings" in names
    shipped = by_name("tied_weights").apply(modeling_source).source  # defines all four itself
    assert "# opensci-patch: tied_weights (transformers < 4.54 ties" not in shipped


# TIED's whole output: the previous output, and the 5.3.0 guard after it
WHOLE_AFTER = PREVIOUS_OUTPUT + '''
    # opensci-patch: tied_weights (transformers 5.3.0 forgets the missing tied keys of remote code)
    def mark_tied_weights_as_initialized(self, *args, **kwargs):
        """Keep the tied keys the checkpoint lacks in `missing_keys`, so that `tie_weights` ties them.

        transformers 5.3.0 drops every flagged key from a remote-code model's missing keys, the tied
        targets this method has just flagged included: `lm_head.weight` then counts as loaded, is not
        tied and stays on the meta device. 5.4 keeps them; this does the same on 5.3.0.
        """
        loading_info = args[0] if args else kwargs.get("loading_info")
        tied = set(getattr(self, "all_tied_weights_keys", None) or ())
        missing_tied = tied & set(getattr(loading_info, "missing_keys", None) or ())
        super().mark_tied_weights_as_initialized(*args, **kwargs)
        if missing_tied:
            loading_info.missing_keys = set(loading_info.missing_keys) | missing_tied
'''


def test_whole_output_the_dict_the_accessors_and_the_5_3_override():
    assert_patch("tied_weights", TIED, WHOLE_AFTER)
