"""auto_docstring_args: the cache parameters of `@auto_docstring` methods are documented in their docstrings.

Contract tests on small sources and the generated-style file, and the installed transformers' own docstring
parser reading the entries. tests/test_hub_kernels_crossversion.py loads the hotfixed files on 4.57.6, 5.2.0 and the
newest pinned release and checks that no `[ERROR]` line is printed.
"""

from __future__ import annotations

import ast
import re

import pytest
from conftest import FIXTURE_DIR
from patch_sources import assert_patch

from opensci_patch._util.errors import PatchError
from opensci_patch.rewrite.patches import by_name

PATCH = by_name("auto_docstring_args")

SMALL = '''\
class OsrModel(PreTrainedModel):
    @check_model_inputs
    @auto_docstring
    def forward(self, input_ids=None, past_key_values=None, cache_position=None, *, cache=None, **kwargs):
        return input_ids


class OsrForCausalLM(PreTrainedModel):
    @auto_docstring(checkpoint="x")
    def forward(self, input_ids=None, past_key_values=None, labels=None):
        r"""
        labels (`torch.LongTensor`, *optional*):
            Labels.

        Example:
        """
        return input_ids

    def helper(self, past_key_values=None):
        return past_key_values
'''


def _docs(source: str) -> dict[str, str | None]:
    return {
        f"{cls.name}.{fn.name}": ast.get_docstring(fn, clean=False)
        for cls in ast.parse(source).body
        if isinstance(cls, ast.ClassDef)
        for fn in cls.body
        if isinstance(fn, ast.FunctionDef)
    }


def _entries(doc: str) -> list[str]:
    return re.findall(r"^        (\w+) \(", doc, re.MULTILINE)


def test_documents_exactly_the_cache_parameters_each_signature_has():
    outcome = PATCH.apply(SMALL)
    assert outcome.status == "applied"
    docs = _docs(outcome.source)
    assert _entries(docs["OsrModel.forward"]) == ["cache", "past_key_values", "cache_position"]
    causal = docs["OsrForCausalLM.forward"]
    assert _entries(causal) == ["past_key_values", "labels"]  # before the existing entries; labels kept
    assert "Example:" in causal
    assert docs["OsrForCausalLM.helper"] is None  # not decorated: untouched


def test_second_application_is_already_applied_with_identical_text():
    once = PATCH.apply(SMALL).source
    twice = PATCH.apply(once)
    assert twice.status == "already-applied" and twice.source == once


def test_the_entries_go_after_an_args_line():
    source = SMALL.replace('r"""\n        labels', 'r"""\n        Args:\n        labels')
    doc = _docs(PATCH.apply(source).source)["OsrForCausalLM.forward"]
    assert doc.index("Args:") < doc.index("past_key_values (") < doc.index("labels (")


def test_refuses_a_docstring_with_a_summary_line_and_no_args_section():
    source = SMALL.replace('r"""\n        labels', 'r"""Summary.\n        labels')
    with pytest.raises(PatchError, match="starts with text and has no `Args:` line"):
        PATCH.apply(source, "modeling_x.py")


def test_not_applicable_to_the_shipped_file_which_uses_no_auto_docstring():
    assert PATCH.apply((FIXTURE_DIR / "modeling_opensci.py").read_text()).status == "not-applicable"


def test_transformers_docstring_parser_reads_the_entries():
    pytest.importorskip("transformers")
    auto = pytest.importorskip("transformers.utils.auto_docstring")
    for name, doc in _docs(PATCH.apply(SMALL).source).items():
        if name.endswith("forward"):
            params, _ = auto.parse_docstring(doc)
            assert "past_key_values" in params, (name, params)


def test_the_generated_file_gets_its_two_forwards_documented():
    pytest.importorskip("transformers")
    from opensci_patch.fixtures.generated import ensure_generated
    from opensci_patch.rewrite.patches import apply_patches, default_patches

    source = (ensure_generated(log=lambda *a: None) / "modeling_opensci.py").read_text()
    patched, status = apply_patches(source, default_patches())
    assert status["auto_docstring_args"] == "applied"
    docs = _docs(patched)
    for name in ("OpensciModel.forward", "OpensciForCausalLM.forward"):
        for param in ("cache (", "past_key_values (", "cache_position ("):
            assert param in docs[name], (name, param)


WHOLE_BEFORE = '''\
class TinyModel(PreTrainedModel):
    @auto_docstring
    def forward(self, input_ids=None, past_key_values=None):
        r"""
        input_ids (`torch.LongTensor`):
            Ids.
        """
        return input_ids

    def helper(self, past_key_values=None):
        return past_key_values
'''

WHOLE_AFTER = '''\
class TinyModel(PreTrainedModel):
    @auto_docstring
    def forward(self, input_ids=None, past_key_values=None):
        # opensci-patch: auto_docstring_args (auto_docstring prints [ERROR] for undocumented parameters)
        r"""
        past_key_values (`~cache_utils.Cache`, *optional*):
            The KV cache of the previous decoding steps (`cache` from transformers 5.24 on).
        input_ids (`torch.LongTensor`):
            Ids.
        """
        return input_ids

    def helper(self, past_key_values=None):
        return past_key_values
'''


def test_whole_output_the_cache_entry_opens_the_decorated_docstring():
    assert_patch(PATCH, WHOLE_BEFORE, WHOLE_AFTER)
