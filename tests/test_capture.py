"""capture, in process, with the installed transformers: statuses, the KV-cache self-check, bad input."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from conftest import FIXTURE_DIR, cache_dropping_copy, edit_config

from opensci_patch._util import fs
from opensci_patch._util.errors import CaptureError, ModelDirError
from opensci_patch.measure.capture import CaptureSettings, capture
from opensci_patch.measure.isolation import isolated_hf_cache
from opensci_patch.rewrite.patches import apply_patches, default_patches


def test_target_rank_is_not_fooled_by_nan_logits():
    import torch

    from opensci_patch.measure.capture import target_rank

    logits = torch.tensor([1.0, 3.0, 2.0])
    assert target_rank(logits, 1) == 1
    assert target_rank(logits, 0) == 3
    assert target_rank(torch.tensor([float("nan"), 3.0]), 0) is None
    assert target_rank(torch.tensor([float("nan"), 3.0, 5.0]), 1) == 2


@pytest.fixture(scope="module")
def patched(tmp_path_factory) -> Path:
    """The shipped checkpoint with the default patches (what `hotfix` writes, minus the manifest)."""
    dst = tmp_path_factory.mktemp("capture") / "patched"
    shutil.copytree(FIXTURE_DIR, dst)
    modeling = dst / "modeling_opensci.py"
    modeling.write_text(apply_patches(modeling.read_text(), default_patches(), modeling.name)[0])
    return dst


def run(model: Path, **options):
    with isolated_hf_cache():
        return capture(CaptureSettings(model=model, **options), log=lambda *a: None)


def test_patched_model_decodes_with_its_cache_as_without(patched):
    rec = run(patched, max_new_tokens=6)
    kv = rec.generation.kv_check
    assert rec.status == "ok", rec.error
    assert kv.ok and kv.first_bad_step is None and kv.max_abs_diff <= kv.tolerance
    # one sha per decode step, the prompt's forward included
    assert len(rec.generation.step_logits_sha256) == len(rec.generation.ids) == 6


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_forward_that_drops_its_cache_is_a_generate_mismatch_at_step_1(tmp_path, dtype):
    rec = run(cache_dropping_copy(tmp_path / "m"), dtype=dtype, max_new_tokens=5)
    assert rec.status == "generate-mismatch"
    assert rec.generation.kv_check.first_bad_step == 1
    assert rec.generation.kv_check.max_abs_diff > 1.0
    assert "decode step 1" in rec.error.message


def test_nan_in_a_weight_is_not_ok(tmp_path, patched):
    import torch
    from safetensors.torch import load_file, save_file

    dst = tmp_path / "nan"
    shutil.copytree(patched, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    rec = run(dst, max_new_tokens=2)
    assert rec.status == "nonfinite-logits"
    assert torch.isnan(torch.tensor(rec.target.logit))


def test_reference_uses_the_config_class_default_for_a_key_config_json_lacks(tmp_path, patched):
    dst = tmp_path / "no-eps"
    shutil.copytree(patched, dst)
    config = json.loads((dst / "config.json").read_text())
    del config["rms_norm_eps"]  # the model now runs with its class default; so must the reference
    (dst / "config.json").write_text(json.dumps(config))
    rec = run(dst, max_new_tokens=1)
    assert rec.status == "ok"
    assert rec.reference.max_abs_diff < 1e-4


def test_a_prompt_past_the_models_positions_is_warned_about(tmp_path, patched):
    dst = tmp_path / "short"
    shutil.copytree(patched, dst)
    config = json.loads((dst / "config.json").read_text())
    config["max_position_embeddings"] = 8
    (dst / "config.json").write_text(json.dumps(config))
    rec = run(dst, max_new_tokens=4)
    assert any("max_position_embeddings (8)" in w for w in rec.warnings)


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("prompt", "", "prompt is empty"),
        ("device", "bogus", "not a device"),
        ("max_new_tokens", 0, "at least 1"),
        ("max_new_tokens", -3, "at least 1"),
        ("dtype", "float8", "not one of"),
    ],
)
def test_bad_settings_are_refused_before_loading(patched, option, value, words):
    with pytest.raises(CaptureError, match=words):
        run(patched, **{option: value})


@pytest.mark.parametrize(
    "header",
    [[1, 2], {"w": {"dtype": "F32", "shape": [1]}}, {"w": {"data_offsets": ["a", 4]}}, {"w": {"data_offsets": [4, 0]}}],
)
def test_a_safetensors_header_of_the_wrong_shape_is_a_model_dir_error(tmp_path, patched, header):
    dst = tmp_path / "bad"
    shutil.copytree(patched, dst)
    blob = json.dumps(header).encode()
    (dst / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 16)
    with pytest.raises(ModelDirError, match="corrupt safetensors"):
        run(dst)


@pytest.mark.crossversion
@pytest.mark.parametrize("version", ["4.48.0", "5.2.0"])
def test_the_self_check_needs_no_other_release(tmp_path, version):
    """The dropped cache is caught on any release, by the cell itself: no reference cell involved."""
    from test_crossversion import capture as capture_in

    code, rec = capture_in(version, cache_dropping_copy(tmp_path / "m"), tmp_path / "r.json")
    assert code == 1 and rec["status"] == "generate-mismatch"
    assert rec["generation"]["kv_check"]["first_bad_step"] == 1


# --- issue 19: a library module the release lacks is one line ----------------------------------------------


def test_a_missing_library_module_is_named_with_the_release_it_first_appears_in():
    from opensci_patch.measure.library_modules import explain, missing_module

    try:
        import transformers.models.no_such_model_19.modeling_no_such_model_19  # noqa: F401
    except ModuleNotFoundError as exc:
        wrapped = RuntimeError("loading the remote code failed")
        wrapped.__cause__ = exc
        assert missing_module(wrapped) == "transformers.models.no_such_model_19"
    config_error = ValueError(
        "The checkpoint you are trying to load has model type `no_such_model_19` but Transformers does not "
        "recognize this architecture."
    )
    assert missing_module(config_error) == "transformers.models.no_such_model_19"
    assert missing_module(ModuleNotFoundError("No module named 'numpyx'", name="numpyx")) is None
    assert missing_module(ValueError("model type `llama` but Transformers does not recognize")) is None  # it exists
    assert explain("transformers.models.qwen3", "4.48.0") == (
        "the model needs transformers.models.qwen3, which transformers 4.48.0 does not have "
        "(it first appears in transformers 4.51.0)"
    )
    assert explain("transformers.models.x", "5.24.0").endswith("(added in a later release, or removed)")
    # a module upstream removed is not said to come later (5.24 dropped modeling_attn_mask_utils)
    assert explain("transformers.modeling_attn_mask_utils", "5.24.0") == (
        "the model needs transformers.modeling_attn_mask_utils, which transformers 5.24.0 does not have "
        "(removed in transformers 5.24.0; `opensci-patch hotfix` the checkpoint)"
    )


def test_capture_of_code_importing_a_module_the_release_lacks_records_one_line(model_dir: Path, tmp_path: Path, cli):
    modeling = model_dir / "modeling_opensci.py"
    modeling.write_text(
        "from transformers.models.no_such_model_19.configuration_x import XConfig  # noqa\n" + modeling.read_text()
    )
    proc = cli("capture", str(model_dir), "--out", str(tmp_path / "r.json"), "--quiet")
    assert proc.returncode == 1
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["status"] == "load-error"
    assert record["error"]["type"] == "MissingLibraryModule"
    assert record["error"]["message"].startswith("the model needs transformers.models.no_such_model_19, which ")
    assert proc.stderr.strip().splitlines()[-1].endswith("(added in a later release, or removed)")


def test_a_fresh_capture_record_round_trips_through_its_json(tmp_path, patched):
    """What capture builds (typed parts) is what load reads back from the file it writes, field for field."""
    from opensci_patch.measure import records

    rec = run(patched, max_new_tokens=2)
    path = fs.write_atomic(tmp_path / "r.json", rec)
    back = records.load(path)
    assert back == rec and back.to_json() == path.read_text() == rec.to_json()
    assert back.to_dict() == json.loads(path.read_text())


class _CausalToy:
    """A causal 'model' whose logits at position p depend on ids[:p + 1] only; counts its no-cache forwards."""

    def __init__(self, last_only: bool = False):
        self.calls, self.last_only = 0, last_only

    def __call__(self, input_ids, use_cache):
        import torch

        self.calls += 1
        sums = torch.cumsum(input_ids[0].float(), 0)
        logits = torch.stack([torch.sin(sums * (k + 1)) for k in range(10)], dim=-1)[None]
        return type("Out", (), {"logits": logits[:, -1:] if self.last_only else logits})()


class _Tok:
    def decode(self, ids):
        return str(ids)


@pytest.mark.parametrize("last_only", [False, True])
def test_the_kv_check_recomputes_every_step_in_one_forward(last_only):
    """Before: one no-cache forward per decode step (20 per capture, ~70% of its time)."""
    import torch

    from opensci_patch.measure.kv_check import check_decode_steps

    sequence, prompt = torch.tensor([3, 1, 4]), 3
    for _ in range(5):  # greedy, as generate would
        sequence = torch.cat([sequence, _CausalToy()(sequence[None], use_cache=False).logits[0, -1].argmax()[None]])
    full = _CausalToy()(sequence[None], use_cache=False).logits[0]
    steps = [full[prompt - 1 + i] for i in range(5)]
    steps[3] = steps[3] + 1.0  # step 3 went wrong with the cache
    toy = _CausalToy(last_only)
    kv = check_decode_steps(toy, _Tok(), sequence, prompt, steps, "float32")
    assert (kv.ok, kv.first_bad_step) == (False, 3) and kv.max_abs_diff == pytest.approx(1.0)
    assert toy.calls == (1 + 5 if last_only else 1)  # a last-position-only model: one try, then one per step


# --- tensors missing from, unused in, or of another shape than the model --------------------------------------------


def _hotfixed_with_layers(cli, model_dir: Path, tmp_path: Path, layers: int) -> Path:
    import json

    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    out = tmp_path / f"fixed{layers}"
    assert cli("hotfix", str(model_dir), "--out", str(out)).returncode == 0
    return out


@pytest.mark.parametrize(("layers", "reference", "words"), [
    (4, "off", "18 tensor(s) the model needs are not in the checkpoint"),  # was: status ok, 18 tensors random
    (4, "auto", "18 tensor(s) the model needs are not in the checkpoint"),  # was: a bare traceback
    (2, "off", "18 checkpoint tensor(s) the model does not use"),
])  # fmt: skip
def test_a_checkpoint_whose_tensors_do_not_match_its_config_is_never_ok(cli, model_dir, tmp_path, layers, reference,
                                                                        words):  # fmt: skip
    from opensci_patch.measure import records

    fixed = _hotfixed_with_layers(cli, model_dir, tmp_path, layers)
    out = tmp_path / "r.json"
    proc = cli("capture", str(fixed), "--reference", reference, "--max-new-tokens", "1", "--out", str(out))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    record = records.load(out)
    assert record.status == "weights-mismatch" and words in record.error.message


def test_a_shape_mismatch_names_the_tensors_instead_of_an_unshown_report(cli, model_dir, tmp_path):
    from opensci_patch.measure import records

    assert cli("hotfix", str(model_dir), "--out", str(tmp_path / "fixed")).returncode == 0
    edit_config(tmp_path / "fixed", intermediate_size=128)
    out = tmp_path / "r.json"
    proc = cli("capture", str(tmp_path / "fixed"), "--out", str(out), "--max-new-tokens", "1")
    assert proc.returncode == 1 and "above report" not in proc.stderr
    record = records.load(out)
    assert record.status == "weights-mismatch"
    assert "(256, 96) in the checkpoint, (128, 96) in the model" in record.error.message

