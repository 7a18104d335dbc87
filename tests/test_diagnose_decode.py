"""diagnose sees the decode loop: what `generate` hands the model per step, and the cause at the first bad step.

Fast tests build decode records by hand (or run the probe in this interpreter); the cross-version
test runs `opensci-patch diagnose` on a pair where B's forward drops its KV cache
(`conftest.cache_dropping_copy`, the injected fault) and checks that it names the step and the cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE_DIR, cache_dropping_copy

from opensci_patch.diagnose.decode import compare_decode, explain_step
from opensci_patch.diagnose.report import decode_verdict
from opensci_patch.diagnose.stages import DECODE, DECODE_LOGITS, NOCACHE_LOGITS

PROMPT = 5  # tokens
READS_PKV = ["input_ids", "attention_mask", "position_ids", "past_key_values", "use_cache", "cache_position"]


def _call(step: int, name: str | None = "past_key_values", before: int | None = None, after: int | None = None,
          position: int | None = None) -> dict:  # fmt: skip
    """One forward call of a correct decode loop at `step`, unless told otherwise."""
    before = (PROMPT + step - 1 if step else 0) if before is None else before
    after = (PROMPT + step) if after is None else after
    position = PROMPT + step - 1 if position is None else position
    return {
        "cache_in": {} if name is None else {name: {"type": "DynamicCache", "length": before}},
        "cache_after": {} if name is None else {name: after},
        "position_ids": [position],
        "cache_position": [position],
        "attention_mask": [1, PROMPT + step],
        "use_cache": True,
    }


def _decode(calls: list[dict], params: list[str] = READS_PKV) -> dict:
    return {"status": "ok", "steps": len(calls), "prompt_length": PROMPT, "forward_params": params, "calls": calls}


def test_names_a_cache_passed_under_a_name_the_forward_does_not_read():
    """5.24: generate passes `cache=`, the forward reads `past_key_values`, the passed cache never grows."""
    calls = [_call(0, "cache", after=0), _call(1, "cache", before=PROMPT, after=PROMPT)]
    cause = explain_step(_decode(calls), 1)
    assert "got no cache" in cause and "`cache=`" in cause and "reads `past_key_values`" in cause


def test_names_a_forward_that_drops_the_cache_it_reads():
    calls = [_call(0), _call(1, before=PROMPT, after=PROMPT)]
    cause = explain_step(_decode(calls), 1)
    assert f"cache of length {PROMPT}" in cause and f"left it at {PROMPT}" in cause and "drops the cache" in cause


def test_names_a_missing_cache():
    cause = explain_step(_decode([_call(0), _call(1, name=None)]), 1)
    assert "got no cache" in cause and "neither" in cause


def test_names_a_cache_of_the_wrong_length_and_wrong_positions():
    short = explain_step(_decode([_call(0), _call(1), _call(2, before=1, after=2)]), 2)
    assert "length 1" in short and f"{PROMPT + 1} tokens precede" in short
    shifted = explain_step(_decode([_call(0), _call(1, position=0)]), 1)
    assert "position_ids" in shifted and f"position {PROMPT}" in shifted


def test_a_right_cache_and_positions_point_at_the_cached_computation_itself():
    cause = explain_step(_decode([_call(0), _call(1)]), 1)
    assert "computes something else" in cause


def _write_side(d: Path, decode: dict, logits: torch.Tensor, nocache: torch.Tensor, tokens: list[int]) -> Path:
    d.mkdir(parents=True)
    (d / DECODE).write_text(json.dumps(decode | {"tokens": tokens}))
    torch.save(logits, d / DECODE_LOGITS)
    torch.save(nocache, d / NOCACHE_LOGITS)
    return d


@pytest.fixture
def steps() -> torch.Tensor:
    return torch.randn(4, 32, generator=torch.Generator().manual_seed(0)) * 5


def test_compare_decode_names_the_first_bad_step_and_its_cause(tmp_path, steps):
    """B's cached step 1 leaves its no-cache recomputation: A vs B differ at step 1, B is named with the cause."""
    good = [_call(k) for k in range(4)]
    dropped = [_call(0)] + [_call(k, before=PROMPT, after=PROMPT) for k in range(1, 4)]
    broken = steps.clone()
    broken[1:] += 3.0
    a = _write_side(tmp_path / "a", _decode(good), steps, steps, [1, 2, 3, 4])
    b = _write_side(tmp_path / "b", _decode(dropped), broken, steps, [1, 9, 9, 9])
    result = compare_decode(a, b, ("A", "B"), ("float32", "float32"))
    assert result["diverged"] is True and result["first_step"]["step"] == 1 and result["first_token"] == 1
    assert result["sides"]["A"]["first_bad_step"] is None
    assert result["sides"]["B"]["first_bad_step"]["step"] == 1
    [finding] = result["findings"]
    assert (
        finding.startswith("B: decode step 1: logits leave the no-cache recomputation") and "drops the cache" in finding
    )
    text = decode_verdict(result, ("A", "B"))
    assert "not in the decode loop" in text and "decode step 1" in text and finding in text


def test_decode_tolerance_is_dtype_aware(tmp_path, steps):
    """A gap of 0.05 between the cached and the no-cache step is a bug in float32 and rounding in bfloat16."""
    nudged = steps.clone()
    nudged[2] += 0.05
    calls = _decode([_call(k) for k in range(4)])
    a = _write_side(tmp_path / "a", calls, steps, steps, [1, 2, 3, 4])
    b = _write_side(tmp_path / "b", calls, nudged, steps, [1, 2, 3, 4])
    fp32 = compare_decode(a, b, ("A", "B"), ("float32", "float32"))
    assert fp32["sides"]["B"]["first_bad_step"]["step"] == 2 and fp32["first_step"]["step"] == 2
    bf16 = compare_decode(a, b, ("A", "B"), ("float32", "bfloat16"))
    assert bf16["first_step"] is None and bf16["status"] == "agree"


def test_probe_records_what_generate_hands_the_model(tmp_path):
    """In this interpreter: the probe of the cache-dropping model records the decode loop and its first bad step."""
    from opensci_patch.diagnose.probe import probe

    model = cache_dropping_copy(tmp_path / "drop")
    out = tmp_path / "probe"
    info = probe(model, out, decode_steps=3, log=lambda *a: None)
    assert info["status"] == "ok" and info["decode"] == {"status": "ok", "steps": 3}
    decode = json.loads((out / DECODE).read_text())
    assert decode["prompt_length"] == len(info["input_ids"])
    assert len(decode["calls"]) == 3 and len(decode["tokens"]) == 3
    step1 = decode["calls"][1]
    assert step1["input_ids"] == [1, 1]  # one new token per decode step
    assert [c["length"] for c in step1["cache_in"].values()] == [len(info["input_ids"])]  # prompt cached by step 0
    logits = torch.load(out / DECODE_LOGITS, weights_only=True)
    nocache = torch.load(out / NOCACHE_LOGITS, weights_only=True)
    assert torch.allclose(logits[0], nocache[0], atol=1e-4)  # the prefill needs no cache
    assert not torch.allclose(logits[1], nocache[1], atol=1e-2)  # step 1 attends only to itself
    result = compare_decode(out, out, ("A", "B"), ("float32", "float32"))
    assert result["sides"]["B"]["first_bad_step"]["step"] == 1
    assert "cache" in result["sides"]["B"]["text"].split(";", 1)[1]


@pytest.mark.crossversion
def test_cli_diagnose_names_the_decode_step_and_the_missing_cache(cli, tmp_path):
    """`opensci-patch diagnose --model-b`: B's forward drops its cache; the forward agrees, decode step 1 does not."""
    dropping = cache_dropping_copy(tmp_path / "dropping")
    out = tmp_path / "diag"
    proc = cli(
        "diagnose", "5.2.0:patched:system", "5.2.0:patched:system", "--model", str(FIXTURE_DIR),
        "--model-b", str(dropping), "--out", str(out), timeout=900,
    )  # fmt: skip
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 1, proc.stderr
    result = json.loads((out / "diagnose.json").read_text())
    assert result["first_divergence"] is None and result["status"] == "diverged"
    decode = result["decode"]
    assert decode["first_step"]["step"] == 1
    assert decode["sides"]["A"]["first_bad_step"] is None
    assert decode["sides"]["B"]["first_bad_step"]["step"] == 1
    text = decode["sides"]["B"]["text"]
    assert text.startswith("B: decode step 1:")
    assert "cache of length 5" in text and "left it at 5" in text and "drops the cache" in text
    assert text in proc.stdout and text in result["verdict"]
    assert not (out / "models").exists()


def test_a_side_that_fails_in_generate_is_a_finding(tmp_path, steps):
    """generate raising on one side (5.24's mask helper did on generated files) diverges and names the error."""
    a = _write_side(tmp_path / "a", _decode([_call(k) for k in range(4)]), steps, steps, [1, 2, 3, 4])
    b = tmp_path / "b"
    b.mkdir()
    error = {"type": "TypeError", "message": "create_causal_mask() missing 1 required positional argument: 'cache'"}
    (b / DECODE).write_text(json.dumps({"status": "generate-error", "steps": 0, "error": error}))
    result = compare_decode(a, b, ("A", "B"), ("float32", "float32"))
    assert result["diverged"] is True
    assert result["findings"] == [f"B: decode: generate-error: TypeError: {error['message']}"]
    assert result["findings"][0] in decode_verdict(result, ("A", "B"))
