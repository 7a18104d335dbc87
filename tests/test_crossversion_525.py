"""transformers 5.25.0 turns hub kernels on by default and pins kernels>=0.19.1,<0.20, which this index cannot meet.

With the committed overrides (kernels 0.17.2 installed) and with kernels left out, the hotfixed shipped and generated
files load on 5.25.0 with kernels off and give 4.48.0's logits and 20 greedy ids; `use_kernels=True` is still
honoured (and then needs kernels, as upstream says). Unpatched for it, every load fails ("Kernels are not
available"). Also: no transformers `[ERROR]`/🚨 docstring-check line at load on 4.57.6, 5.2.0 and the newest pinned
release.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from test_crossversion import generated, models  # noqa: F401  (module fixtures, reused)

from opensci_patch.matrix import overrides
from opensci_patch.matrix import spec as matrix
from opensci_patch.matrix.envs import ensure_env, run_python

pytestmark = pytest.mark.crossversion

NO_KERNELS = ['kernels; sys_platform == "never"']  # uv leaves a dependency out whose marker is never true


def _env(version: str, without_kernels: bool = False):
    lifted = NO_KERNELS if without_kernels else overrides.for_release(overrides.load(overrides.COMMITTED), version)
    return ensure_env(version, "system", log=lambda *a: None, overrides=lifted)


def _capture(env, model: Path, out: Path) -> tuple[int, dict]:
    args = ["-m", "opensci_patch.cli", "capture", str(model), "--out", str(out), "--quiet"]
    proc = run_python(env, args, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(out.read_text())


@pytest.fixture(scope="module")
def shipped_448(models, tmp_path_factory) -> dict:  # noqa: F811
    rc, rec = _capture(_env("4.48.0"), models["patched"], tmp_path_factory.mktemp("ref") / "4.48.0.json")
    assert rc == 0, rec.get("error")
    return rec


@pytest.mark.parametrize("without_kernels", [False, True], ids=["kernels-0.17", "no-kernels"])
@pytest.mark.parametrize("kind", ["shipped", "generated"])
def test_hotfixed_file_on_5_25_gives_448s_logits_with_kernels_off(
    kind,
    without_kernels,
    models,  # noqa: F811
    generated,  # noqa: F811
    shipped_448,
    tmp_path,
):
    env = _env("5.25.0", without_kernels)
    model = models["patched"] if kind == "shipped" else generated["patched"]
    rc, rec = _capture(env, model, tmp_path / "5.25.0.json")
    assert rc == 0, rec.get("error")
    assert rec["environment"]["transformers"] == "5.25.0"
    assert rec["environment"]["kernels"] == {"installed": None if without_kernels else "0.17.2", "used": False}
    assert rec["environment"]["overrides"] == list(env.overrides)
    assert rec["logits_sha256"] == shipped_448["logits_sha256"]
    assert len(rec["generation"]["ids"]) == 20
    assert rec["generation"]["ids"] == shipped_448["generation"]["ids"]
    assert rec["generation"]["step_logits_sha256"][1:] == shipped_448["generation"]["step_logits_sha256"][1:]


LOAD = """\
import sys
from transformers import AutoModelForCausalLM
kwargs = {"use_kernels": True} if sys.argv[2] == "kernels" else {}
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, **kwargs)
except Exception as exc:
    print(f"LOAD-ERROR {type(exc).__name__}: {exc}")
else:
    print("LOADED")
"""


def _load(env, model: Path, *, use_kernels: bool = False) -> str:
    """stdout and stderr of one from_pretrained in a fresh process and modules cache (the checks run at import)."""
    with tempfile.TemporaryDirectory() as modules:
        extra = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": modules}
        args = ["-c", LOAD, str(model), "kernels" if use_kernels else "-"]
        proc = run_python(env, args, env_vars=extra, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_use_kernels_true_is_honoured_and_needs_kernels_as_upstream_says(models):  # noqa: F811
    out = _load(_env("5.25.0"), models["patched"], use_kernels=True)
    assert "LOAD-ERROR ValueError: Kernels are not available" in out


def test_without_the_hub_kernels_patch_5_25_refuses_to_load(models, tmp_path):  # noqa: F811
    from opensci_patch.rewrite.hotfix import hotfix
    from opensci_patch.rewrite.patches import default_patches

    only = [p.name for p in default_patches() if p.name != "hub_kernels"]
    result = hotfix(models["original"], tmp_path / "no-hub-kernels", only=only, log=lambda *a: None)
    out = _load(_env("5.25.0"), result.dst)
    assert "LOAD-ERROR ValueError: Kernels are not available" in out


ERROR_RELEASES = ["4.57.6", "5.2.0", matrix.TRANSFORMERS_VERSIONS[-1]]


@pytest.mark.parametrize("version", ERROR_RELEASES)
@pytest.mark.parametrize("kind", ["shipped", "generated"])
def test_no_library_error_lines_at_load(version, kind, models, generated):  # noqa: F811
    model = models["patched"] if kind == "shipped" else generated["patched"]
    out = _load(_env(version), model)
    assert "LOADED" in out, out
    bad = [line for line in out.splitlines() if "[ERROR]" in line or "\N{POLICE CARS REVOLVING LIGHT}" in line]
    assert bad == [], bad


def test_the_error_check_would_see_the_lines_it_looks_for(generated, tmp_path):  # noqa: F811
    """The same load of the generated file without auto_docstring_args prints them (so the test above can fail)."""
    from opensci_patch.rewrite.hotfix import hotfix
    from opensci_patch.rewrite.patches import default_patches

    only = [p.name for p in default_patches() if p.name != "auto_docstring_args"]
    result = hotfix(generated["original"], tmp_path / "undocumented", only=only, log=lambda *a: None)
    out = _load(_env(matrix.TRANSFORMERS_VERSIONS[-1]), result.dst)
    assert "LOADED" in out and "[ERROR] `past_key_values` is part of OpensciModel.forward's signature" in out
