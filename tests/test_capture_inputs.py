"""capture refuses, up front and as bad input (exit 2, one line, no record), what would otherwise be recorded as a
failure of the model: code in another hub repo, a device this tool does not run, token ids the model does not have."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import edit_config, one_line_exit_2

from opensci_patch._util.errors import CaptureError, ModelDirError
from opensci_patch.measure.capture import CaptureSettings, check_settings
from opensci_patch.measure.input_checks import check_auto_map

HUB_REF = "some-org/some-model--modeling_opensci.OpensciForCausalLM"


# --- an auto_map naming another hub repo ---------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [HUB_REF, [None, HUB_REF]], ids=["model", "tokenizer-pair"])
def test_an_auto_map_naming_another_hub_repo_is_bad_input(model_dir: Path, entry):
    data = json.loads((model_dir / "config.json").read_text())
    data["auto_map"]["AutoModelForCausalLM"] = entry
    with pytest.raises(ModelDirError, match=r"AutoModelForCausalLM.*some-org/some-model.*not in the directory"):
        check_auto_map(model_dir, data)


def test_capture_refuses_an_auto_map_into_another_repo_and_records_nothing(cli, model_dir: Path, tmp_path: Path):
    auto_map = json.loads((model_dir / "config.json").read_text())["auto_map"]
    edit_config(model_dir, auto_map={**auto_map, "AutoModelForCausalLM": HUB_REF})
    out = tmp_path / "r.json"
    one_line_exit_2(cli("capture", str(model_dir), "--out", str(out)), "auto_map", "some-org/some-model")
    assert not out.exists()


# --- devices -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["mps", "xpu", "xpu:0", "meta", "cuda:x"])
def test_devices_other_than_cpu_and_cuda_are_refused_by_the_settings_check(device: str):
    with pytest.raises(CaptureError, match="use cpu or cuda"):
        check_settings(CaptureSettings(model=Path("m"), device=device))


def test_capture_on_mps_is_refused_before_loading_and_records_nothing(cli, model_dir: Path, tmp_path: Path):
    out = tmp_path / "r.json"
    one_line_exit_2(cli("capture", str(model_dir), "--device", "mps", "--out", str(out)), "'mps'")
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
    edit_config(model_dir, vocab_size=vocab)
    out = tmp_path / "r.json"
    proc = cli("capture", str(model_dir), "--prompt", prompt, "--target", target, "--out", str(out))
    one_line_exit_2(proc, f"token id {vocab}", f"vocab_size is {vocab}", what)
    assert not out.exists()


# --- impossible sizes, prompts and safetensors headers; missing files -----------------------------------------------


@pytest.mark.parametrize(("value", "words"), [(1e23, "not a positive integer"), (10**9, "of memory available"),
                                               (0, "not a positive integer")])  # fmt: skip
def test_impossible_sizes_are_refused_before_the_model_is_built(cli, model_dir: Path, tmp_path: Path, value, words):
    edit_config(model_dir, num_hidden_layers=value)
    out = tmp_path / "r.json"
    one_line_exit_2(cli("capture", str(model_dir), "--out", str(out), timeout=120), words)
    assert not out.exists()


def test_a_prompt_longer_than_the_models_positions_is_refused(cli, model_dir: Path):
    one_line_exit_2(cli("capture", str(model_dir), "--prompt", "word " * 20000), "max_position_embeddings (512)")


def _rewrite_header(path: Path, edit) -> None:
    import json
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n :])


def _first(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


@pytest.mark.parametrize("damage", ["overlap", "dtype", "shape"])
def test_malformed_safetensors_offsets_dtypes_and_shapes_are_bad_input(cli, model_dir: Path, damage: str):
    def edit(header: dict) -> None:
        entry = _first(header)
        if damage == "overlap":  # a tensor whose bytes run into the next one's
            entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][1] + 4]
        elif damage == "dtype":
            entry["dtype"] = "Q9"
        else:
            entry["shape"] = [*entry["shape"], 2]

    _rewrite_header(model_dir / "model.safetensors", edit)
    one_line_exit_2(cli("capture", str(model_dir)), "corrupt safetensors")


def test_a_missing_tokenizer_json_is_blamed_on_the_tokenizer_not_on_target(cli, model_dir: Path):
    (model_dir / "tokenizer.json").unlink()  # tokenizer_config.json alone loads a tokenizer with no vocabulary
    proc = cli("capture", str(model_dir))
    one_line_exit_2(proc, "tokenizer.json is missing")
    assert "--target" not in proc.stderr


def test_auto_map_naming_a_missing_file_is_bad_input(cli, model_dir: Path, tmp_path: Path):
    (model_dir / "configuration_opensci.py").unlink()
    out = tmp_path / "r.json"
    one_line_exit_2(cli("capture", str(model_dir), "--out", str(out)), "configuration_opensci.py")
    assert not out.exists()

