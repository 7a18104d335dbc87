"""cache_kwarg: a forward taking `past_key_values` also takes the KV cache as `cache=` (transformers 5.24's generate).

Contract tests (applies, verifies, idempotent, refuses, not applicable) on the shipped file and small sources,
what the inserted code does when called, and a decode loop of the hotfixed shipped model under the installed
transformers that passes the cache only as `cache=` and never passes `cache_position`.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import FIXTURE_DIR
from patch_sources import assert_patch

from opensci_patch._util.errors import PatchError
from opensci_patch.rewrite.patches import by_name, default_patches

PATCH = by_name("cache_kwarg")
MODELING = FIXTURE_DIR / "modeling_opensci.py"

# A generated-style forward: decorators, a docstring, `**kwargs` passed on to an inner call.
SMALL = '''\
class Inner:
    def forward(self, input_ids=None, past_key_values=None, **kwargs):
        return {"past_key_values": past_key_values, "kwargs": kwargs}


class Outer:
    inner = Inner()

    @staticmethod
    def helper(past_key_values=None):
        return past_key_values

    def forward(
        self,
        input_ids=None,
        past_key_values=None,
        use_cache=None,
        **kwargs,
    ):
        """Docstring first: the inserted code goes after it."""
        return self.inner.forward(input_ids=input_ids, past_key_values=past_key_values, **kwargs)


class Rotary:
    def forward(self, x, position_ids):
        return x
'''


def _namespace(source: str) -> dict:
    namespace: dict = {}
    exec(compile(source, "patched", "exec"), namespace)
    return namespace


def _forwards(source: str) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(source)
    return {
        cls.name: fn
        for cls in tree.body
        if isinstance(cls, ast.ClassDef)
        for fn in cls.body
        if isinstance(fn, ast.FunctionDef) and fn.name == "forward"
    }


def test_applies_to_the_shipped_file_where_forwards_take_past_key_values():
    source = MODELING.read_text()
    outcome = PATCH.apply(source, "modeling_opensci.py")
    assert outcome.status == "applied"
    compile(outcome.source, "modeling_opensci.py", "exec")
    before, after = _forwards(source), _forwards(outcome.source)
    takes = {name for name, fn in before.items() if "past_key_values" in {a.arg for a in fn.args.args}}
    assert takes == {"OpensciModel", "OpensciForCausalLM"}
    for name, fn in after.items():
        kwonly = [a.arg for a in fn.args.kwonlyargs]
        if name in takes:
            assert kwonly == ["cache"] and ast.unparse(fn.args.kw_defaults[0]) == "None"
            assert fn.args.kwarg is not None  # **kwargs still last
            assert ast.unparse(fn.body[0]).startswith("if cache is not None:")
        else:
            assert ast.unparse(fn) == ast.unparse(before[name])  # attention, layers, rotary: untouched
    assert outcome.source.count("# opensci-patch: cache_kwarg") == 2


def test_second_application_is_already_applied_with_identical_text():
    for source in (MODELING.read_text(), SMALL):
        once = PATCH.apply(source).source
        twice = PATCH.apply(once)
        assert twice.status == "already-applied"
        assert twice.source == once


def test_inserted_code_passes_the_cache_under_either_name_and_refuses_two():
    outer = _namespace(PATCH.apply(SMALL).source)["Outer"]()
    cache, other = object(), object()
    assert outer.forward(cache=cache)["past_key_values"] is cache  # 5.24's generate
    assert outer.forward(past_key_values=cache)["past_key_values"] is cache  # every older release
    assert outer.forward(past_key_values=cache, cache=cache)["past_key_values"] is cache
    assert outer.forward()["past_key_values"] is None
    # `cache` is a parameter now, so it is not handed on in **kwargs as well; other keywords still are
    assert outer.forward(cache=cache, flag=1)["kwargs"] == {"flag": 1}
    with pytest.raises(ValueError, match="one KV cache as `cache` and another as `past_key_values`"):
        outer.forward(past_key_values=cache, cache=other)


def test_the_docstring_stays_first_and_other_functions_are_untouched():
    patched = PATCH.apply(SMALL).source
    forward = _forwards(patched)["Outer"]
    assert ast.get_docstring(forward) == "Docstring first: the inserted code goes after it."
    assert ast.unparse(forward.body[1]).startswith("if cache is not None:")
    helper = _namespace(patched)["Outer"].helper
    assert list(inspect.signature(helper).parameters) == ["past_key_values"]  # not a forward


@pytest.mark.parametrize(
    ("signature", "call"),
    [
        ("self, past_key_values=None", "self, past_key_values=None, *, cache=None"),
        ("self, past_key_values=None,", "self, past_key_values=None, *, cache=None,"),
        ("self, *args, past_key_values=None", "self, *args, past_key_values=None, cache=None"),
        (
            "self, past_key_values=None, *, flag=False, **kw",
            "self, past_key_values=None, *, flag=False, cache=None, **kw",
        ),
        ("self, past_key_values=None, *args, **kw", "self, past_key_values=None, *args, cache=None, **kw"),
    ],
)
def test_cache_becomes_keyword_only_in_any_signature_layout(signature: str, call: str):
    source = f"class M:\n    def forward({signature}):\n        return past_key_values\n"
    patched = PATCH.apply(source).source
    assert f"def forward({call}):" in patched
    model = _namespace(patched)["M"]()
    parameters = inspect.signature(model.forward).parameters
    assert parameters["cache"].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(parameters)[-1] == ("kw" if "**kw" in signature else "cache")
    marker = object()
    assert model.forward(cache=marker) is marker


def test_a_signature_written_one_parameter_per_line_stays_that_way():
    patched = PATCH.apply(SMALL).source
    assert "        use_cache=None,\n        *,\n        cache=None,\n        **kwargs,\n" in patched


@pytest.mark.parametrize(
    ("old", "new", "why"),
    [
        (
            "        use_cache=None,\n",
            "        use_cache=None,\n        cache=None,\n",
            "already takes a `cache` parameter",
        ),
        (
            "        use_cache=None,\n",
            "        use_cache=None,\n        *,\n        cache: object = None,\n",
            "did not add",
        ),
        ('        """Docstring', '        cache = kwargs.get("cache")\n        """Docstring', "uses the name `cache`"),
        ("**kwargs)\n", 'cache=kwargs.pop("cache", None), **kwargs)\n', "uses the name `cache`"),
    ],
)
def test_refuses_a_forward_that_handles_a_cache_of_its_own(old: str, new: str, why: str):
    assert SMALL.count(old) == 1
    with pytest.raises(PatchError, match=rf"patch 'cache_kwarg' cannot rewrite modeling_x\.py: .*{why}"):
        PATCH.apply(SMALL.replace(old, new), "modeling_x.py")


def test_refuses_its_own_code_when_the_parameter_was_removed():
    patched = PATCH.apply(SMALL).source.replace("        *,\n        cache=None,\n", "")
    with pytest.raises(PatchError, match="uses the name `cache` without taking it"):
        PATCH.apply(patched, "modeling_x.py")


def test_an_attribute_or_keyword_named_cache_is_not_the_variable():
    source = SMALL.replace(
        "        return self.inner.forward(",
        "        self.cache = None\n        return self.inner.forward(cache_hint=self.cache, ",
    )
    assert PATCH.apply(source).status == "applied"


def test_not_applicable_without_a_forward_taking_past_key_values():
    config = (FIXTURE_DIR / "configuration_opensci.py").read_text()
    assert PATCH.apply(config).status == "not-applicable"
    no_cache = SMALL.replace("past_key_values", "state")
    outcome = PATCH.apply(no_cache)
    assert outcome.status == "not-applicable" and outcome.source == no_cache


def test_is_a_default_patch_run_after_moved_helpers():
    names = [p.name for p in default_patches()]
    assert "cache_kwarg" in names and names.index("cache_kwarg") == names.index("moved_helpers") + 1


# --- the hotfixed shipped model under the installed transformers (own process and modules cache) -----

DECODE_SCRIPT = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, attn_implementation="eager").eval()
prompt = torch.tensor([[5, 17, 42, 99, 3, 7, 11]])
out = {}
with torch.no_grad():
    for name in ("cache", "past_key_values"):  # 5.24's name, the older one; never a cache_position
        ids, cache, steps, lengths = prompt, None, [], []
        for _ in range(6):
            o = model(input_ids=ids if cache is None else ids[:, -1:], use_cache=True, **{name: cache})
            cache = o.past_key_values
            lengths.append(cache.get_seq_length())
            steps.append(o.logits[:, -1])
            ids = torch.cat([ids, o.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        out[name] = {"ids": ids[0].tolist(), "lengths": lengths, "logits": torch.stack(steps).tolist()}
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    out["generate"] = generated[0].tolist()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def decoded(tmp_path_factory) -> dict:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from opensci_patch.rewrite.hotfix import hotfix

    tmp = tmp_path_factory.mktemp("cache-kwarg")
    src = tmp / "opensci-tiny"
    shutil.copytree(FIXTURE_DIR, src)
    fixed = hotfix(src, tmp / "opensci-tiny_fixed", log=lambda *a: None).dst
    (tmp / "decode.py").write_text(DECODE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHONPATH", "TRANSFORMERS_"))}
    env.update(HF_MODULES_CACHE=str(tmp / "modules"), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run(
        [sys.executable, str(tmp / "decode.py"), str(fixed)],
        cwd=tmp,  # not the repo: the patched code must not need opensci_patch
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_decode_loop_with_cache_keyword_keeps_the_cache(decoded: dict):
    """The cache handed in as `cache=` is the one the model extends: one more position per step."""
    assert decoded["cache"]["lengths"] == list(range(7, 13))


def test_cache_keyword_decodes_bit_identically_to_past_key_values(decoded: dict):
    assert decoded["cache"]["logits"] == decoded["past_key_values"]["logits"]
    assert decoded["cache"]["ids"] == decoded["past_key_values"]["ids"]


def test_generate_agrees_with_the_manual_decode_loop(decoded: dict):
    assert decoded["generate"] == decoded["cache"]["ids"]


def test_a_forward_dropping_the_cache_would_fail_these_checks(tmp_path):
    """The checks above can fail: the same loop on a model that drops its cache sees one position per step."""
    from conftest import cache_dropping_copy

    pytest.importorskip("transformers")
    broken = cache_dropping_copy(tmp_path / "dropping")
    (tmp_path / "decode.py").write_text(DECODE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHONPATH", "TRANSFORMERS_"))}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "decode.py"), str(broken)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lengths = json.loads(proc.stdout.strip().splitlines()[-1])["cache"]["lengths"]
    assert lengths != list(range(7, 13))


WHOLE_BEFORE = '''\
class TinyModel:
    def forward(self, input_ids, past_key_values=None, **kwargs):
        """Doc."""
        return past_key_values

    def step(self, past_key_values=None):
        return past_key_values
'''

WHOLE_AFTER = '''\
class TinyModel:
    def forward(self, input_ids, past_key_values=None, *, cache=None, **kwargs):
        """Doc."""
        # opensci-patch: cache_kwarg (transformers 5.24 passes the KV cache as cache=)
        if cache is not None:
            if past_key_values is not None and past_key_values is not cache:
                raise ValueError("got one KV cache as `cache` and another as `past_key_values`: pass only one")
            past_key_values = cache
        return past_key_values

    def step(self, past_key_values=None):
        return past_key_values
'''


def test_whole_output_only_forward_takes_cache_and_bridges_it_after_the_docstring():
    assert_patch("cache_kwarg", WHOLE_BEFORE, WHOLE_AFTER)
