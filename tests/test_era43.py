"""era43: our own 4.3x-era Llama-style files (issue 29's classes 1-7) hotfix without refusal and give their 4.48.0
bits on later releases; each of the issue's patches is needed on the release where the issue measured its break."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from research_checkpoint import capture_here, capture_on, same_numerics

from opensci_patch.fixtures.own import ERA43_FILES, build_era43
from opensci_patch.rewrite.patches import apply_patches, default_patches

ISSUE_29 = ("moved_helpers", "legacy_cache", "generation_call", "config_aliases", "rope_scaling", "generation_defaults")


def era43(out: Path, *, without: tuple[str, ...] = (), patched: bool = True) -> Path:
    """The era43 checkpoint at `out`, its two files hotfixed with the default patches but `without` (or unpatched)."""
    build_era43(out)
    if patched:
        chosen = [p for p in default_patches() if p.name not in without]
        for source in ERA43_FILES:
            path = out / source.name
            path.write_text(apply_patches(path.read_text(), chosen, source.name)[0])
    return out


def capture(release: str, model: Path, out: Path) -> dict:
    """A capture on `release`: in this interpreter where it is the installed transformers, else in its env."""
    import transformers

    return capture_here(model, out) if transformers.__version__ == release else capture_on(release, model, out)


def test_hotfix_applies_each_issue_29_patch_and_a_second_run_changes_nothing(tmp_path):
    build_era43(tmp_path / "src")
    first = run_cli("hotfix", str(tmp_path / "src"), "--out", str(tmp_path / "fixed"))
    assert first.returncode == 0, first.stderr
    files = json.loads((tmp_path / "fixed" / "opensci_patch_manifest.json").read_text())["files"]
    applied = {name for f in ERA43_FILES for name, status in files[f.name]["patches"].items() if status == "applied"}
    assert set(ISSUE_29) <= applied
    assert files["configuration_era43.py"]["patches"]["config_aliases"] == "applied"
    second = run_cli("hotfix", str(tmp_path / "fixed"), "--out", str(tmp_path / "again"))
    assert second.returncode == 0, second.stderr
    files = json.loads((tmp_path / "again" / "opensci_patch_manifest.json").read_text())["files"]
    for source in ERA43_FILES:
        entry = files[source.name]
        assert entry["sha256_in"] == entry["sha256_out"]
        assert "applied" not in entry["patches"].values()
        assert {entry["patches"][name] for name in ISSUE_29} <= {"already-applied", "not-applicable"}


@pytest.mark.crossversion
def test_hotfixed_gives_its_4_48_bits_on_4_57_5_2_and_the_installed_release(tmp_path):
    """Bit-identical first logits, 20 greedy ids and decode steps, as its own 4.48.0 capture."""
    model = era43(tmp_path / "fixed")
    reference = capture_on("4.48.0", model, tmp_path / "ref.json")
    assert reference["status"] == "ok" and len(reference["generation"]["ids"]) == 20
    import transformers

    for release in ("4.57.6", "5.2.0", transformers.__version__):
        record = capture(release, model, tmp_path / f"{release}.json")
        assert same_numerics(reference, record), (release, record["status"], record.get("error"))


@pytest.mark.crossversion
@pytest.mark.parametrize(
    ("without", "release", "status", "message"),
    [
        (ISSUE_29, "4.48.0", "load-error", "is_torch_greater_or_equal_than_1_13"),  # the original file
        (ISSUE_29, "4.57.6", "forward-error", "get_max_length"),
        (ISSUE_29, "5.25.0", "load-error", "is_torch_fx_available"),
        (("rope_scaling",), "5.25.0", "load-error", "'type'"),
        (("legacy_cache",), "4.48.0", "generate-error", "Cache only has 0 layers"),
        (("legacy_cache",), "4.57.6", "forward-error", "get_max_length"),
        (("generation_call",), "4.48.0", "generate-error", "standardize_cache_format"),
        (("generation_defaults",), "5.25.0", "load-error", "max_length"),
    ],
)
def test_each_construct_breaks_where_the_issue_says_without_its_patch(tmp_path, without, release, status, message):
    model = era43(tmp_path / "m", without=without, patched=without != ISSUE_29)
    record = capture(release, model, tmp_path / "r.json")
    assert record["status"] == status and message in record["error"]["message"], (record["status"], record["error"])


GENERATE = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
try:
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}")
else:
    print("generated")
"""


@pytest.mark.crossversion
@pytest.mark.parametrize(("without", "printed"), [(("config_aliases",), "num_hidden_layers"), ((), "generated")])
def test_4_57_generate_reads_num_hidden_layers_which_only_the_alias_gives(tmp_path, without, printed):
    """capture refuses a config without `num_hidden_layers` up front (exit 2), so generate is called directly."""
    from opensci_patch.matrix.envs import ensure_env, run_python

    model = era43(tmp_path / "m", without=without)
    env = ensure_env("4.57.6", "system", log=lambda *a: None)
    proc = run_python(env, ["-c", GENERATE, str(model)], timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert printed in proc.stdout.strip().splitlines()[-1], proc.stdout
