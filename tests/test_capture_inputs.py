"""capture refuses, up front and as bad input (exit 2, one line, no record), what would otherwise be recorded as a
failure of the model: code in another hub repo, a device this tool does not run, token ids the model does not have."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opensci_patch._util.errors import CaptureError, ModelDirError
from opensci_patch.measure.capture import CaptureSettings, check_settings
from opensci_patch.measure.input_checks import check_auto_map

HUB_REF = "some-org/some-model--modeling_opensci.OpensciForCausalLM"


def _one_line_exit_2(proc, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config, indent=2))


# --- an auto_map naming another hub repo ---------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [HUB_REF, [None, HUB_REF]], ids=["model", "tokenizer-pair"])
def test_an_auto_map_naming_another_hub_repo_is_bad_input(model_dir: Path, entry):
    data = json.loads((model_dir / "config.json").read_text())
    data["auto_map"]["AutoModelForCausalLM"] = entry
    with pytest.raises(ModelDirError, match=r"AutoModelForCausalLM.*some-org/some-model.*not in the directory"):
        check_auto_map(model_dir, data)


def test_capture_refuses_an_auto_map_into_another_repo_and_records_nothing(cli, model_dir: Path, tmp_path: Path):
    auto_map = json.loads((model_dir / "config.json").read_text())["auto_map"]
    _edit_config(model_dir, auto_map={**auto_map, "AutoModelForCausalLM": HUB_REF})
    out = tmp_path / "r.json"
    _one_line_exit_2(cli("capture", str(model_dir), "--out", str(out)), "auto_map", "some-org/some-model")
    assert not out.exists()


# --- devices -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["mps", "xpu", "xpu:0", "meta", "cuda:x"])
def test_devices_other_than_cpu_and_cuda_are_refused_by_the_settings_check(device: str):
    with pytest.raises(CaptureError, match="use cpu or cuda"):
        check_settings(CaptureSettings(model=Path("m"), device=device))


def test_capture_on_mps_is_refused_before_loading_and_records_nothing(cli, model_dir: Path, tmp_path: Path):
    out = tmp_path / "r.json"
    _one_line_exit_2(cli("capture", str(model_dir), "--device", "mps", "--out", str(out)), "'mps'")
    assert not out.exists()


def test_a_gpu_index_this_torch_does_not_see_is_refused(model_dir: Path, monkeypatch):
    import torch

    from opensci_patch.measure import capture

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(CaptureError, match=r"'cuda:2' asked for, but this torch sees 2 GPU"):
        capture._check_input(CaptureSettings(model=model_dir, device="cuda:2"), model_dir)
    capture._check_input(CaptureSettings(model=model_dir, device="cuda:1"), model_dir)  # there: no refusal


# --- token ids the model's embedding does not have -----------------------------------------------------------------


def _ids(model: Path, text: str) -> list[int]:
    """The ids the checkpoint's tokenizer gives `text`, read with the `tokenizers` library itself."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model / "tokenizer.json")).encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("what", ["prompt", "target"])
def test_token_ids_past_vocab_size_are_bad_input_naming_the_id_and_the_size(cli, model_dir: Path, tmp_path, what):
    prompt, target = "The capital of France is", (" Paris" if what == "target" else "a")
    prompt_max, target_id = max(_ids(model_dir, prompt)), _ids(model_dir, target)[0]
    vocab = prompt_max if what == "prompt" else target_id  # the first id the embedding would not have
    assert (target_id < vocab) if what == "prompt" else (prompt_max < vocab)  # only the one under test is past it
    _edit_config(model_dir, vocab_size=vocab)
    out = tmp_path / "r.json"
    proc = cli("capture", str(model_dir), "--prompt", prompt, "--target", target, "--out", str(out))
    _one_line_exit_2(proc, f"token id {vocab}", f"vocab_size is {vocab}", what)
    assert not out.exists()
