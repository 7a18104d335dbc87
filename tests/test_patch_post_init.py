"""post_init: a model __init__ without self.post_init() gets the call (5.x sets all_tied_weights_keys there)."""

from __future__ import annotations

import textwrap

import pytest
from patch_sources import NO_POST_INIT, assert_patch
from research_checkpoint import capture_here, capture_on, research_checkpoint, same_numerics

from opensci_patch.rewrite.patches import by_name

PATCH = by_name("post_init")


def test_the_call_ends_the_init_that_lacks_it_and_only_that_one():
    patched = PATCH.apply(NO_POST_INIT).source
    lm_init = patched[patched.index("class ResearchForCausalLM") :]
    assert lm_init.rstrip().endswith("self.post_init()")
    assert patched.count("self.post_init()") == 2  # ResearchModel already had its own; nothing added there
    assert PATCH.apply(patched).status == "already-applied"


def test_a_class_extended_by_another_gets_it_at_the_end_of_the_subclass_only():
    source = textwrap.dedent(
        """
        from transformers import PreTrainedModel

        class Base(PreTrainedModel):
            def __init__(self, config):
                super().__init__(config)
                self.a = 1

        class Child(Base):
            def __init__(self, config):
                super().__init__(config)
                self.b = 2
        """
    )
    patched = PATCH.apply(source).source
    assert patched.count("self.post_init()") == 1
    assert patched.rstrip().endswith("self.post_init()")


def test_classes_that_are_no_models_are_not_touched():
    source = "from torch import nn\n\n\nclass Block(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
    assert PATCH.apply(source).status == "not-applicable"


def test_without_it_5x_cannot_load_the_research_file_with_it_loads(tmp_path):
    """On the installed transformers (5.x): every other default patch is not enough."""
    pytest.importorskip("torch")
    without = capture_here(research_checkpoint(tmp_path / "without", without=("post_init",)), tmp_path / "a.json")
    assert without["status"] == "load-error"
    assert "all_tied_weights_keys" in without["error"]["message"]
    with_it = capture_here(research_checkpoint(tmp_path / "with"), tmp_path / "b.json")
    assert with_it["status"] == "ok", with_it.get("error")


@pytest.mark.crossversion
def test_on_4_48_the_patched_file_gives_the_unpatched_files_bits(tmp_path):
    """4.48 loads the research file as it is; post_init (and every other default patch) changes no bit there."""
    unpatched = capture_on("4.48.0", research_checkpoint(tmp_path / "orig", patched=False), tmp_path / "a.json")
    patched = capture_on("4.48.0", research_checkpoint(tmp_path / "fixed"), tmp_path / "b.json")
    assert same_numerics(unpatched, patched)


def test_whole_output_the_call_ends_the_model_init():
    assert_patch(
        "post_init",
        """
        from transformers import PreTrainedModel


        class TinyModel(PreTrainedModel):
            def __init__(self, config):
                super().__init__(config)
                self.layers = []

            def forward(self, x):
                return x
        """,
        """
        from transformers import PreTrainedModel


        class TinyModel(PreTrainedModel):
            def __init__(self, config):
                super().__init__(config)
                self.layers = []
                # opensci-patch: post_init (transformers 5.x sets all_tied_weights_keys there)
                self.post_init()

            def forward(self, x):
                return x
        """,
    )
