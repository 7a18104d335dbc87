"""transformers 5.25.0 turns hub kernels on by default and pins kernels>=0.19.1,<0.20.

Each case installs exactly the `kernels` it names, never whatever the index serves today: absent, too old
(0.17.2, below 5.25.0's pin) and compatible (0.19.1). With the hotfix every case loads with kernels off and gives
4.48.0's logits, 20 greedy ids and decode steps; `use_kernels=True` is still honoured (and then needs kernels, as
upstream says). Unpatched for it, "absent" and "too old" fail to load ("Kernels are not available") and
"compatible" loads offline. Where the index lacks a pinned version the case is skipped with the reason.
Also: no transformers `[ERROR]`/🚨 docstring-check line at load on 4.57.6, 5.2.0 and the newest pinned release.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from packaging.version import Version
from test_crossversion import generated, models  # noqa: F401  (module fixtures, reused)

from opensci_patch.matrix import releases, spec
from opensci_patch.matrix.envs import ensure_env, run_python

pytestmark = pytest.mark.crossversion

# case -> (the override that installs exactly it, the version `capture` must find installed)
KERNELS = {
    "absent": ('kernels; sys_platform == "never"', None),  # uv leaves out a dependency whose marker is never true
    "too-old": ("kernels==0.17.2", "0.17.2"),
    "compatible": ("kernels==0.19.1", "0.19.1"),
}


def _env(version: str, case: str | None = None):
    """The release's env with exactly the case's kernels (None: no override, whatever the release resolves)."""
    if case is not None and (pinned := KERNELS[case][1]) is not None:
        try:
            available = releases.index_versions(timeout=20, project="kernels")
        except releases.IndexUnreachable as exc:
            pytest.skip(f"cannot ask the package index for kernels {pinned}: {exc}")
        if Version(pinned) not in available:
            pytest.skip(f"the package index has no kernels {pinned} (it has {', '.join(map(str, available[-3:]))}...)")
    lifted = [] if case is None else [KERNELS[case][0]]
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


@pytest.mark.parametrize("case", sorted(KERNELS))
@pytest.mark.parametrize("kind", ["shipped", "generated"])
def test_hotfixed_file_on_5_25_gives_448s_logits_with_kernels_off(
    kind,
    case,
    models,  # noqa: F811
    generated,  # noqa: F811
    shipped_448,
    tmp_path,
):
    env = _env("5.25.0", case)
    model = models["patched"] if kind == "shipped" else generated["patched"]
    rc, rec = _capture(env, model, tmp_path / "5.25.0.json")
    assert rc == 0, rec.get("error")
    assert rec["environment"]["transformers"] == "5.25.0"
    assert rec["environment"]["kernels"] == {"installed": KERNELS[case][1], "used": False}
    assert rec["environment"]["overrides"] == [KERNELS[case][0]]
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
    out = _load(_env("5.25.0", "absent"), models["patched"], use_kernels=True)
    assert "LOAD-ERROR ValueError: Kernels are not available" in out


@pytest.fixture(scope="module")
def without_hub_kernels_patch(models, tmp_path_factory) -> Path:  # noqa: F811
    from opensci_patch.rewrite.hotfix import hotfix
    from opensci_patch.rewrite.patches import default_patches

    only = [p.name for p in default_patches() if p.name != "hub_kernels"]
    dst = tmp_path_factory.mktemp("no-hub-kernels") / "model"
    return hotfix(models["original"], dst, only=only, log=lambda *a: None).dst


@pytest.mark.parametrize(("case", "expected"), [
    ("absent", "LOAD-ERROR ValueError: Kernels are not available"),
    ("too-old", "LOAD-ERROR ValueError: Kernels are not available"),
    ("compatible", "LOADED"),  # offline (HF_HUB_OFFLINE=1): no hub kernel can be fetched, the model loads as is
])  # fmt: skip
def test_without_the_hub_kernels_patch_5_25_needs_a_compatible_kernels(case, expected, without_hub_kernels_patch):
    out = _load(_env("5.25.0", case), without_hub_kernels_patch)
    assert expected in out, out


ERROR_RELEASES = ["4.57.6", "5.2.0", spec.TRANSFORMERS_VERSIONS[-1]]


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
    out = _load(_env(spec.TRANSFORMERS_VERSIONS[-1]), result.dst)
    assert "LOADED" in out and "[ERROR] `past_key_values` is part of OpensciModel.forward's signature" in out
