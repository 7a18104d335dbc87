"""config_params: a config __init__'s named parameter that goes nowhere is passed on to super().__init__ (issue 25).

The construct is the modular converter's: a modular config naming pad/bos/eos_token_id, unrolled into Qwen3Config's
body, which never stores them. On 4.x the config then holds None, on 5.x no attribute at all (the model's
`config.pad_token_id` raises). The end-to-end proof is the generated fixture, whose configuration file is built so.
"""

from __future__ import annotations

import json
import tempfile
import textwrap

import pytest
from patch_sources import CONVERTED_CONFIG, assert_patch

from opensci_patch._util.errors import PatchError
from opensci_patch.rewrite.patches import by_name, default_patches

PATCH = by_name("config_params")

# CONVERTED_CONFIG patched, written by hand
EXPECTED = """\
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
        # opensci-patch: config_params (a named parameter is not in **kwargs: its config.json value was lost)
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )
"""


def test_the_unused_token_ids_are_passed_on_before_kwargs():
    assert_patch(PATCH, CONVERTED_CONFIG, EXPECTED, filename="configuration_osr.py")


def test_on_a_library_config_base_any_unread_parameter_is_passed_on_in_the_calls_layout():
    source = textwrap.dedent(
        """\
        from transformers import Qwen3Config


        class MyConfig(Qwen3Config):
            def __init__(self, hidden_size=8, head_dim=None, flag=True, *, extra=3, **kwargs):
                self.head_dim = head_dim or hidden_size // 2
                if flag:
                    self.flagged = 1
                super().__init__(hidden_size=hidden_size, **kwargs)
        """
    )
    expected = textwrap.dedent(
        """\
        from transformers import Qwen3Config


        class MyConfig(Qwen3Config):
            def __init__(self, hidden_size=8, head_dim=None, flag=True, *, extra=3, **kwargs):
                self.head_dim = head_dim or hidden_size // 2
                if flag:
                    self.flagged = 1
                # opensci-patch: config_params (a named parameter is not in **kwargs: its config.json value was lost)
                super().__init__(hidden_size=hidden_size, extra=extra, **kwargs)
        """
    )
    assert PATCH.apply(source).source == expected  # read parameters (head_dim, flag) are left as they are


def test_a_config_that_keeps_every_parameter_and_other_classes_are_not_applicable():
    passed = "pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,"
    keeps = CONVERTED_CONFIG.replace("**kwargs,\n        )", f"{passed}\n            **kwargs,\n        )")
    assert PATCH.apply(keeps).status == "not-applicable"
    not_a_config = "class Block:\n    def __init__(self, unused=1):\n        super().__init__()\n"
    assert PATCH.apply(not_a_config).status == "not-applicable"


def test_a_lost_parameter_without_a_super_init_call_is_refused_naming_patch_and_file():
    source = CONVERTED_CONFIG.replace("super().__init__(", "PretrainedConfig.__init__(\n            self,")
    with pytest.raises(
        PatchError,
        match=r"patch 'config_params' cannot rewrite configuration_osr\.py: OsrConfig"
        r"\.__init__ loses pad_token_id, bos_token_id, eos_token_id and calls no super\(\)\.__init__",
    ):
        PATCH.apply(source, "configuration_osr.py")


def _config_class(source: str):
    namespace: dict = {"__name__": "configuration_osr"}
    exec(compile(source, "configuration_osr.py", "exec", dont_inherit=True), namespace)
    return namespace["OsrConfig"]


def test_under_the_installed_transformers_the_ids_reach_the_config_only_when_patched():
    """config.json's ids as from_pretrained passes them (keywords); the installed release is 5.x, where the base class
    does not define them."""
    pytest.importorskip("transformers")
    ids = {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 0}
    unpatched = _config_class(CONVERTED_CONFIG)(**ids)
    patched = _config_class(EXPECTED)(**ids)
    assert {name: getattr(patched, name) for name in ids} == ids
    assert all(getattr(unpatched, name, "missing") in (None, "missing") for name in ids)


# --- end to end: the generated fixture's converter-style config, on 4.48.0, 4.57.6 and 5.25.0 ----------------------

PROBE = """\
import json, sys
from transformers import AutoConfig
config = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
print(json.dumps({n: getattr(config, n, "missing") for n in ("pad_token_id", "bos_token_id", "eos_token_id")}))
"""
RELEASES = ["4.48.0", "4.57.6", "5.25.0"]


@pytest.fixture(scope="module")
def generated_dirs(tmp_path_factory) -> dict:
    from opensci_patch.fixtures.generated import ensure_generated
    from opensci_patch.rewrite.hotfix import hotfix

    root = tmp_path_factory.mktemp("config-params")
    source = ensure_generated(log=lambda *a: None)
    without = [p.name for p in default_patches() if p.name != PATCH.name]
    return {
        "source": source,
        "with": hotfix(source, root / "with", log=lambda *a: None).dst,
        "without": hotfix(source, root / "without", only=without, log=lambda *a: None).dst,
    }


def _env(version: str):
    from test_hub_kernels_crossversion import _env as env_of  # the release's env, shared with those tests

    return env_of(version)


def _ids(version: str, model) -> dict:
    from opensci_patch.matrix.envs import run_python

    with tempfile.TemporaryDirectory() as modules:
        extra = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": modules}
        proc = run_python(_env(version), ["-c", PROBE, str(model)], env_vars=extra, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.crossversion
@pytest.mark.parametrize("version", RELEASES)
def test_config_json_ids_are_what_the_loaded_config_holds(generated_dirs, version):
    stored = json.loads((generated_dirs["source"] / "config.json").read_text())
    expected = {n: stored[n] for n in ("pad_token_id", "bos_token_id", "eos_token_id")}
    assert _ids(version, generated_dirs["with"]) == expected
    lost = {n: None if version.startswith("4.") else "missing" for n in expected}  # what the patch repairs
    assert _ids(version, generated_dirs["without"]) == lost


@pytest.mark.crossversion
def test_without_it_the_generated_model_fails_on_5_25_at_pad_token_id(generated_dirs, tmp_path):
    from opensci_patch.matrix.envs import run_python

    out = tmp_path / "without.json"
    args = ["-m", "opensci_patch.cli", "capture", str(generated_dirs["without"]), "--out", str(out), "--quiet"]
    proc = run_python(_env("5.25.0"), args, timeout=600)
    assert proc.returncode == 1, proc.stderr
    record = json.loads(out.read_text())
    assert record["status"] == "load-error" and record["error"]["type"] == "AttributeError"
    assert "'OpensciConfig' object has no attribute 'pad_token_id'" in record["error"]["message"]


def test_a_config_on_a_config_class_of_the_file_is_checked_too():
    source = CONVERTED_CONFIG + textwrap.dedent(
        """\


        class OsrVisionConfig(OsrConfig):
            def __init__(self, patch_size=4, **kwargs):
                OsrConfig.__init__(self, **kwargs)
        """
    )
    with pytest.raises(PatchError, match=r"OsrVisionConfig\.__init__ loses patch_size and calls no super"):
        PATCH.apply(source, "configuration_osr.py")
