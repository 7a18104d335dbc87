"""remote_code: a remote file on a library config says is_remote_code(), so 5.3.0 keeps its loaded weights."""

from __future__ import annotations

import pytest
from patch_sources import NO_POST_INIT, assert_patch, modeling_source
from research_checkpoint import capture_on, research_checkpoint, same_numerics

from opensci_patch._util.errors import PatchError
from opensci_patch.rewrite.patches import by_name

PATCH = by_name("remote_code")


def test_the_base_model_class_of_a_file_on_a_library_config_reports_remote_code():
    patched = PATCH.apply(NO_POST_INIT).source
    base = patched[patched.index("class ResearchPreTrainedModel") : patched.index("class ResearchModel")]
    assert "def is_remote_code(cls):" in base and "return True" in base
    assert patched.count("def is_remote_code") == 1  # only the class deriving from PreTrainedModel itself
    assert PATCH.apply(patched).status == "already-applied"


# a vendored copy's config comes from a module of its checkpoint (which may re-export the library's class)
SIBLING = """\
from transformers import PreTrainedModel

from .configuration_tiny import TinyConfig


class TinyPreTrainedModel(PreTrainedModel):
    config_class = TinyConfig


class TinyModel(TinyPreTrainedModel):
    pass
"""

# SIBLING patched, written by hand
SIBLING_EXPECTED = """\
from transformers import PreTrainedModel

from .configuration_tiny import TinyConfig


class TinyPreTrainedModel(PreTrainedModel):
    config_class = TinyConfig

    # opensci-patch: remote_code (transformers 5.3.0 re-initialises loaded weights of remote code it counts as library code)
    @classmethod
    def is_remote_code(cls):
        \"\"\"Loaded from a checkpoint's code, also when its config class is the library's.\"\"\"
        return True


class TinyModel(TinyPreTrainedModel):
    pass
"""  # noqa: E501 (the marker line, as written)


def test_whole_output_for_a_config_imported_from_a_module_of_the_checkpoint():
    assert_patch(PATCH, SIBLING, SIBLING_EXPECTED)


def test_the_shipped_file_with_its_own_config_class_gets_it_too():
    """`from .configuration_opensci import OpensciConfig`: 5.3+ already count it as remote code (registered)."""
    patched = PATCH.apply(modeling_source()).source
    assert patched.count("def is_remote_code(cls):") == 1
    base = patched[patched.index("class OpensciPreTrainedModel") :].split("\nclass ")[0]
    assert "def is_remote_code(cls):" in base


def test_a_file_importing_no_config_class_or_only_the_base_is_not_applicable():
    assert PATCH.apply(SIBLING.replace("from .configuration_tiny import TinyConfig", "TinyConfig = None")).status == (
        "not-applicable"
    )
    base_only = SIBLING.replace("from .configuration_tiny import TinyConfig", "from .base import PretrainedConfig")
    assert PATCH.apply(base_only).status == "not-applicable"


def test_the_inserted_method_returns_true_and_a_foreign_one_is_refused():
    patched = PATCH.apply(NO_POST_INIT).source
    body = patched[patched.index("    @classmethod") :].split("\n\n")[0]
    namespace: dict = {}
    exec("class C:\n" + body + "\n", namespace)
    assert namespace["C"].is_remote_code() is True
    foreign = NO_POST_INIT.replace(
        "    config_class = LlamaConfig\n",
        "    config_class = LlamaConfig\n\n    @classmethod\n    def is_remote_code(cls):\n        return False\n",
    )
    with pytest.raises(PatchError, match="defines its own is_remote_code"):
        PATCH.apply(foreign)


@pytest.mark.crossversion
def test_5_3_0_wipes_the_loaded_weights_without_it_and_gives_4_48s_bits_with_it(tmp_path):
    """The cause of issue 19's Llama-3.2 5.3.0 failure: the `.data.normal_()` _init_weights runs over loaded weights."""
    reference = capture_on("4.48.0", research_checkpoint(tmp_path / "ref"), tmp_path / "ref.json")
    without = capture_on(
        "5.3.0", research_checkpoint(tmp_path / "without", without=("remote_code",)), tmp_path / "a.json"
    )
    assert without["status"] == "ok" and without["logits_sha256"] != reference["logits_sha256"]
    with_it = capture_on("5.3.0", research_checkpoint(tmp_path / "with"), tmp_path / "b.json")
    assert same_numerics(with_it, reference)
