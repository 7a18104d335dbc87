"""hub_kernels: the model's `from_pretrained` keeps hub kernels off unless the caller asks (transformers 5.25).

Contract tests on the shipped and generated-style sources, and what the inserted classmethod passes to stand-in
upstream `from_pretrained`s shaped like 4.48's (no `use_kernels`), 5.24's and 5.25's (reads it; 5.25 turns None
into True). tests/test_hub_kernels_crossversion.py loads the hotfixed files on the real 5.25.0.
"""

from __future__ import annotations

import ast
import functools

import pytest
from conftest import FIXTURE_DIR
from patch_sources import assert_patch

from opensci_patch._util.errors import PatchError
from opensci_patch.rewrite.patches import by_name

PATCH = by_name("hub_kernels")
MODELING = FIXTURE_DIR / "modeling_opensci.py"

SMALL = '''\
class PreTrainedModel:
    pass


class OsrPreTrainedModel(PreTrainedModel):
    """Docstring."""

    base_model_prefix = "model"


class OsrForCausalLM(OsrPreTrainedModel):
    pass
'''


def _from_pretrained_classes(source: str) -> set[str]:
    return {
        cls.name
        for cls in ast.parse(source).body
        if isinstance(cls, ast.ClassDef)
        and any(isinstance(f, ast.FunctionDef) and f.name == "from_pretrained" for f in cls.body)
    }


def test_applies_to_the_class_that_subclasses_pretrainedmodel():
    source = MODELING.read_text()
    outcome = PATCH.apply(source, "modeling_opensci.py")
    assert outcome.status == "applied"
    compile(outcome.source, "modeling_opensci.py", "exec")
    assert _from_pretrained_classes(outcome.source) == {"OpensciPreTrainedModel"}
    assert outcome.source.count("# opensci-patch: hub_kernels") == 1
    # nothing else changed: the new source minus the inserted method is the old one
    assert outcome.source.count("\n") > source.count("\n")
    assert PATCH.apply(outcome.source).status == "already-applied"


def test_applies_to_the_generated_file(generated_source):
    outcome = PATCH.apply(generated_source, "modeling_opensci.py")
    assert outcome.status == "applied"
    assert _from_pretrained_classes(outcome.source) == {"OpensciPreTrainedModel"}
    # the RMSNorm decorator stays: it only marks the layer, nothing replaces it while kernels are off
    assert '@use_kernel_forward_from_hub("RMSNorm")' in outcome.source


def test_second_application_is_already_applied_with_identical_text():
    once = PATCH.apply(SMALL).source
    twice = PATCH.apply(once)
    assert twice.status == "already-applied"
    assert twice.source == once


def test_not_applicable_without_a_pretrainedmodel_subclass():
    config = (FIXTURE_DIR / "configuration_opensci.py").read_text()
    assert PATCH.apply(config).status == "not-applicable"


def test_refuses_a_foreign_from_pretrained():
    foreign = SMALL.replace(
        '    base_model_prefix = "model"\n',
        '    base_model_prefix = "model"\n\n    @classmethod\n    def from_pretrained(cls, *a, **k):\n'
        "        return super().from_pretrained(*a, **k)\n",
    )
    with pytest.raises(PatchError, match="defines its own from_pretrained"):
        PATCH.apply(foreign, "modeling_x.py")


def _upstream(kind: str):
    """A stand-in PreTrainedModel whose from_pretrained reads `use_kernels` like the named release."""

    class Base:
        seen: dict = {}

    if kind == "4.48":  # no use_kernels: an unknown keyword would reach the config and the model

        def from_pretrained(cls, *args, **kwargs):
            Base.seen = dict(kwargs)
            return cls

    elif kind == "5.24":

        def from_pretrained(cls, *args, **kwargs):
            Base.seen = dict(kwargs)
            Base.seen["resolved"] = kwargs.pop("use_kernels", False)
            return cls

    else:  # 5.25, behind a functools.wraps decorator as later releases put around it

        def inner(cls, *args, **kwargs):
            Base.seen = dict(kwargs)
            use = kwargs.pop("use_kernels", None)
            Base.seen["resolved"] = True if use is None else use
            return cls

        @functools.wraps(inner)
        def from_pretrained(cls, *args, **kwargs):
            return inner(cls, *args, **kwargs)

    Base.from_pretrained = classmethod(from_pretrained)
    return Base


def _model(kind: str):
    patched = PATCH.apply(SMALL.replace("class PreTrainedModel:\n    pass\n", "")).source
    namespace = {"PreTrainedModel": _upstream(kind)}
    exec(compile(patched, "patched", "exec"), namespace)
    return namespace["OsrForCausalLM"], namespace["PreTrainedModel"]


def test_5_25_gets_use_kernels_false_unless_the_caller_asks():
    model, base = _model("5.25")
    model.from_pretrained("dir", trust_remote_code=True)
    assert base.seen["resolved"] is False  # without the patch 5.25 resolves None to True
    model.from_pretrained("dir", use_kernels=True)
    assert base.seen["resolved"] is True
    model.from_pretrained("dir", kernel_config="cfg")  # a kernel config is a request for kernels
    assert "use_kernels" not in base.seen


def test_5_24_is_unchanged_and_4_48_never_sees_the_keyword():
    model, base = _model("5.24")
    model.from_pretrained("dir")
    assert base.seen["resolved"] is False and base.seen["use_kernels"] is False
    model, base = _model("4.48")
    model.from_pretrained("dir", trust_remote_code=True)
    assert base.seen == {"trust_remote_code": True}


@pytest.fixture(scope="module")
def generated_source(tmp_path_factory) -> str:
    pytest.importorskip("transformers")
    from opensci_patch.fixtures.generated import ensure_generated

    return (ensure_generated(log=lambda *a: None) / "modeling_opensci.py").read_text()


WHOLE_BEFORE = """\
from transformers import PreTrainedModel


class TinyPreTrainedModel(PreTrainedModel):
    base_model_prefix = "model"


class TinyForCausalLM(TinyPreTrainedModel):
    pass
"""

WHOLE_AFTER = '''\
from transformers import PreTrainedModel


class TinyPreTrainedModel(PreTrainedModel):
    base_model_prefix = "model"

    # opensci-patch: hub_kernels (transformers 5.25 turns hub kernels on by default)
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`use_kernels=False` unless the caller asks for hub kernels (transformers 5.25 defaults to True).

        Passed only where the installed `from_pretrained` reads the keyword (4.53+): older releases hand
        unknown keywords on to the model. A caller's `use_kernels` or `kernel_config` goes through as given.
        """
        upstream = super().from_pretrained
        func = getattr(upstream, "__func__", upstream)
        while hasattr(func, "__wrapped__"):
            func = func.__wrapped__
        reads = "use_kernels" in getattr(getattr(func, "__code__", None), "co_consts", ())
        if reads and "use_kernels" not in kwargs and "kernel_config" not in kwargs:
            kwargs["use_kernels"] = False
        return upstream(*args, **kwargs)


class TinyForCausalLM(TinyPreTrainedModel):
    pass
'''


def test_whole_output_the_root_model_class_gets_the_method():
    assert_patch("hub_kernels", WHOLE_BEFORE, WHOLE_AFTER)
