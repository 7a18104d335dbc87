"""union_annotations: `X | Y` annotations become `Union[X, Y]`, which 4.57.6's @auto_docstring can read."""

from __future__ import annotations

import textwrap

import pytest
from patch_sources import PEP604, assert_patch

from opensci_patch.rewrite.patches import by_name

PATCH = by_name("union_annotations")


def test_parameters_returns_and_fields_are_rewritten_and_union_imported():
    source = textwrap.dedent(
        '''\
        """A model file."""
        from dataclasses import dataclass

        import torch


        @dataclass
        class Output:
            logits: torch.Tensor | None = None


        def forward(x, keep: int | torch.Tensor = 0, mask: (torch.Tensor | None) | bool = None) -> Output | None:
            nested: list[int | None] = []
            return x | 1
        '''
    )
    patched = PATCH.apply(source).source
    assert "logits: Union[torch.Tensor, None] = None" in patched
    assert "keep: Union[int, torch.Tensor] = 0" in patched
    assert "mask: Union[torch.Tensor, None, bool] = None" in patched
    assert "-> Union[Output, None]:" in patched
    assert "nested: list[int | None]" in patched  # not outermost: has a __name__, auto_docstring reads it
    assert "return x | 1" in patched  # an expression, not an annotation
    assert (
        patched.index('"""A model file."""') < patched.index("from typing import Union") < patched.index("import torch")
    )
    assert PATCH.apply(patched).status == "already-applied"


def test_an_existing_typing_import_is_reused():
    patched = PATCH.apply("from typing import Optional, Union\n\n\ndef f(x: int | None): ...\n").source
    assert patched.count("import") == 1 and "def f(x: Union[int, None])" in patched


def test_a_file_with_postponed_annotations_is_not_applicable():
    """Strings have no __module__: 4.57.6's auto_docstring takes them as they are."""
    source = "from __future__ import annotations\n\n\ndef f(x: int | None): ...\n"
    assert PATCH.apply(source).status == "not-applicable"


def test_the_rewritten_annotations_mean_the_same_types():
    import typing

    import torch

    namespace: dict = {}
    exec(PATCH.apply(PEP604).source.replace("    @auto_docstring\n", ""), namespace)
    hints = typing.get_type_hints(namespace["ResearchForCausalLM"].forward)
    assert hints["logits_to_keep"] == (int | torch.Tensor)


AUTO_DOCSTRING_SCRIPT = r"""
import sys, types
module = types.ModuleType("pep604_test")
try:
    exec(compile(open(sys.argv[1]).read(), sys.argv[1], "exec"), module.__dict__)
except AttributeError as exc:
    print("AttributeError:", exc)
else:
    print("ok")
"""


@pytest.mark.crossversion
def test_4_57_6_auto_docstring_fails_on_the_union_and_reads_the_rewrite(tmp_path):
    from opensci_patch.matrix.envs import ensure_env, run_python

    env = ensure_env("4.57.6", "system", log=lambda *a: None)
    script = tmp_path / "run.py"
    script.write_text(AUTO_DOCSTRING_SCRIPT)
    results = {}
    for name, text in (("plain", PEP604), ("patched", PATCH.apply(PEP604).source)):
        (tmp_path / f"{name}.py").write_text(text)
        proc = run_python(env, [str(script), str(tmp_path / f"{name}.py")], timeout=300)
        results[name] = proc.stdout.strip().splitlines()[-1]
    assert results["plain"] == "AttributeError: 'types.UnionType' object has no attribute '__name__'"
    assert results["patched"] == "ok"


def test_whole_output_unions_become_union_and_union_is_imported():
    assert_patch(
        "union_annotations",
        """
        import torch


        def forward(ids: torch.Tensor | None, scale: int | float | None = 1) -> torch.Tensor | tuple:
            return ids
        """,
        """
        # opensci-patch: union_annotations (transformers 4.57 @auto_docstring cannot read X | Y annotations)
        from typing import Union
        import torch


        def forward(ids: Union[torch.Tensor, None], scale: Union[int, float, None] = 1) -> Union[torch.Tensor, tuple]:
            return ids
        """,
    )
