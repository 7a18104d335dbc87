"""relative_imports: a file vendored from transformers' tree gets absolute imports; `from .sibling` stays (issue 25).

Read against the file's notional package transformers/models/<name>/: `..` is transformers.models, `...` is
transformers. It runs before loss_kwargs, which refused such a file ("LossKwargs is used but not imported from
transformers"). The end-to-end proof is transformers 4.48.0's Llama file as it is in the tree (tests/llama_style.py,
`vendored=True`): unpatched no release loads it; hotfixed it gives the absolute-import file's 4.48.0 logits on 4.48.0
and 5.25.0.
"""

from __future__ import annotations

import json
import textwrap

import llama_style
import pytest
from patch_sources import VENDORED, assert_patch

from opensci_patch._util.errors import PatchError
from opensci_patch.rewrite.patches import apply_patches, by_name, default_patches, relative_imports

PATCH = by_name("relative_imports")

# VENDORED patched, written by hand
EXPECTED = """\
import torch
from torch import nn

# opensci-patch: relative_imports (remote code is loaded outside the transformers package)
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from .configuration_osr import OsrConfig


class OsrMLP(nn.Module):
    def __init__(self, config: OsrConfig):
        super().__init__()
        self.act_fn = ACT2FN[config.hidden_act]
        self.norm = LlamaRMSNorm(config.hidden_size)
"""


def test_two_and_three_dots_become_transformers_one_dot_stays():
    assert_patch(PATCH, VENDORED, EXPECTED, filename="modeling_osr.py")


def test_package_imports_and_imports_inside_functions():
    source = textwrap.dedent(
        """\
        from ... import PretrainedConfig
        from .. import llama


        def helper():
            from ...utils import logging

            return logging
        """
    )
    expected = textwrap.dedent(
        """\
        # opensci-patch: relative_imports (remote code is loaded outside the transformers package)
        from transformers import PretrainedConfig
        from transformers.models import llama


        def helper():
            from transformers.utils import logging

            return logging
        """
    )
    assert PATCH.apply(source).source == expected


def test_only_sibling_imports_is_not_applicable():
    source = "from .configuration_osr import OsrConfig\nfrom transformers import PreTrainedModel\n"
    assert PATCH.apply(source).status == "not-applicable"


def test_a_module_no_supported_release_has_is_refused_naming_import_file_and_release():
    version, _ = relative_imports.installed()
    with pytest.raises(
        PatchError,
        match=rf"patch 'relative_imports' cannot rewrite modeling_osr\.py: `from \.\.\.activation_fns import ACT2FN` "
        rf"names transformers\.activation_fns, which transformers {version} \(installed\) does not have",
    ):
        PATCH.apply(VENDORED.replace("...activations", "...activation_fns"), "modeling_osr.py")
    with pytest.raises(PatchError, match=r"`from \.\.\.\.activations import ACT2FN` climbs above the transformers"):
        PATCH.apply(VENDORED.replace("...activations", "....activations"), "modeling_osr.py")


def test_a_module_of_another_supported_release_is_accepted(monkeypatch, tmp_path):
    """The installed release (here a stand-in folder with two modules) lacks it; 4.48.0..5.23.0 have it."""
    (tmp_path / "activations.py").write_text("")
    (tmp_path / "models" / "llama").mkdir(parents=True)
    (tmp_path / "models" / "llama" / "__init__.py").write_text("")
    monkeypatch.setattr(relative_imports, "installed", lambda: ("9.9.9", tmp_path))
    source = "from ...modeling_attn_mask_utils import AttentionMaskConverter\nfrom ...activations import ACT2FN\n"
    assert PATCH.apply(source).status == "applied"
    with pytest.raises(PatchError, match=r"transformers\.modeling_utils, which transformers 9\.9\.9 \(installed\)"):
        PATCH.apply("from ...modeling_utils import PreTrainedModel\n")
    assert PATCH.apply("from ..llama import LlamaConfig\n").status == "applied"  # a package: its __init__.py


def test_it_runs_before_loss_kwargs_which_then_finds_the_import():
    """Before it, loss_kwargs refused the file: "LossKwargs is used but not imported from transformers"."""
    names = [p.name for p in default_patches()]
    assert names.index("relative_imports") < names.index("loss_kwargs")
    source = VENDORED.replace(
        "from ...modeling_utils import PreTrainedModel\n",
        "from ...modeling_utils import PreTrainedModel\nfrom ...utils import LossKwargs\n",
    )
    source += "\n\nclass KwargsForCausalLM(LossKwargs):\n    ...\n"
    patched, statuses = apply_patches(source, default_patches(), "modeling_osr.py")
    assert statuses["relative_imports"] == statuses["loss_kwargs"] == "applied"
    assert "import LossKwargs" not in patched and "class KwargsForCausalLM(TransformersKwargs):" in patched


# --- end to end: transformers 4.48.0's Llama file as it is in the tree ------------------------------------------


@pytest.fixture(scope="module")
def vendored(tmp_path_factory) -> dict:
    from opensci_patch.rewrite.hotfix import hotfix

    root = tmp_path_factory.mktemp("vendored")
    original = llama_style.build(root / "llama-vendored", vendored=True)
    result = hotfix(original, root / "llama-vendored_fixed", log=lambda *a: None)
    plain = llama_style.build(root / "llama-absolute")  # the same file with the imports made absolute by hand
    return {"original": original, "fixed": result.dst, "summary": result.summary, "plain": plain}


@pytest.mark.crossversion
def test_the_vendored_file_is_hotfixed_with_its_sibling_left_local(vendored):
    assert vendored["summary"]["relative_imports"] == vendored["summary"]["loss_kwargs"] == "applied"
    assert vendored["summary"]["remote_code"] == "applied"
    fixed = (vendored["fixed"] / llama_style.MODELING).read_text()
    assert "from transformers.activations import ACT2FN" in fixed
    assert "from .configuration_llama import LlamaConfig" in fixed
    configuration = (vendored["fixed"] / "configuration_llama.py").read_text()
    assert "from transformers.models.llama.configuration_llama import LlamaConfig" in configuration


@pytest.mark.crossversion
def test_unpatched_the_vendored_file_fails_on_4_48(vendored, tmp_path):
    from test_crossversion import capture

    rc, rec = capture("4.48.0", vendored["original"], tmp_path / "original.json", "--reference", "off")
    assert rc == 1 and rec["status"] == "load-error"
    assert "No such file or directory" in rec["error"]["message"]


@pytest.fixture(scope="module")
def baseline(vendored, tmp_path_factory) -> dict:
    """The absolute-import file, unpatched, on 4.48.0 (the release it was written for)."""
    from test_crossversion import capture

    out = tmp_path_factory.mktemp("baseline") / "plain.json"
    rc, rec = capture("4.48.0", vendored["plain"], out, "--reference", "off")
    assert rc == 0, rec.get("error")
    return rec


@pytest.mark.crossversion
@pytest.mark.parametrize("version", ["4.48.0", "5.3.0", "5.25.0"])
def test_hotfixed_vendored_file_gives_the_absolute_files_4_48_logits(vendored, baseline, version, tmp_path):
    """5.3.0: the config comes through `from .configuration_llama`, which remote_code must see (else 5.3.0 re-runs
    the file's `.data.normal_()` _init_weights over the loaded weights)."""
    from test_patch_config_params import _env

    from opensci_patch.matrix.envs import run_python

    out = tmp_path / "fixed.json"
    args = ["-m", "opensci_patch.cli", "capture", str(vendored["fixed"]), "--out", str(out), "--quiet"]
    proc = run_python(_env(version), [*args, "--reference", "off"], timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = json.loads(out.read_text())
    assert rec["environment"]["transformers"] == version
    assert rec["logits_sha256"] == baseline["logits_sha256"]
    assert len(rec["generation"]["ids"]) == 20 and rec["generation"]["ids"] == baseline["generation"]["ids"]
