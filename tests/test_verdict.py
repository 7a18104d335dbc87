"""The three "matches the reference" rules side by side, on one reference record and edits of it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from opensci_patch import demo
from opensci_patch.diagnose import TOLERANCE
from opensci_patch.measure import records
from opensci_patch.results import verdict


@pytest.fixture(scope="module")
def ref_json() -> dict:
    return json.loads(demo.REFERENCE_RECORD.read_text(encoding="utf-8"))


def edited(ref_json: dict, edit) -> records.Record:
    data = json.loads(json.dumps(ref_json))
    edit(data)
    return records.Record.from_dict(data)


def rounded(d):  # another CPU's SIMD path: other bits, the same tokens, logits 2e-5 apart
    d["logits_sha256"] = "0" * 64
    d["topk"][0]["logit"] += 2e-5


def rope_broken(d):  # far from the fp64 forward, yet the same tokens and hashes as the reference record
    d["reference"]["max_abs_diff"] = 4.7


def wrong_second_token(d):
    d["generation"]["ids"][1] += 1


def kv_mismatch(d):
    d["status"] = "generate-mismatch"
    d["generation"]["kv_check"] |= {"ok": False, "first_bad_step": 1, "detail": "decode step 1: differs"}
    d["error"] = {"type": "KVCacheMismatch", "message": "decode step 1: differs", "traceback_tail": ""}


# edit -> (bit_identical, same_tokens_within(1e-4), within_fp64_tolerance)
CASES = {
    "unchanged": (lambda d: None, (True, True, True)),
    "rounded": (rounded, (False, True, True)),
    "rope_broken": (rope_broken, (False, True, False)),
    "wrong_second_token": (wrong_second_token, (False, False, True)),
    "kv_mismatch": (kv_mismatch, (False, False, False)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_rule_promises_what_its_name_says(ref_json, name):
    edit, expected = CASES[name]
    rec, ref = edited(ref_json, edit), records.Record.from_dict(ref_json)
    got = (
        verdict.bit_identical(rec, ref)[0],
        verdict.same_tokens_within(demo.TOLERANCE)(rec, ref)[0],
        verdict.within_fp64_tolerance(rec)[0],
    )
    assert got == expected


def test_the_tolerance_rules_take_their_bound_from_the_caller_and_diagnose(ref_json):
    ref = records.Record.from_dict(ref_json)
    rec = edited(ref_json, rounded)
    assert verdict.same_tokens_within(1e-5)(rec, ref) == (False, "top-10 logits differ by 2e-05 (> 1e-05)")
    gap = ref.reference.max_abs_diff
    assert (
        verdict.within_fp64_tolerance(ref)[1]
        == f"max |logit - fp64 ref| = {gap:.3g} (tolerance {TOLERANCE['float32']:g})"
    )


def test_bit_identical_names_the_first_decode_step_that_differs(ref_json):
    def step_3(d):
        d["generation"]["step_logits_sha256"][3] = "f" * 64

    ref = records.Record.from_dict(ref_json)
    assert verdict.bit_identical(edited(ref_json, step_3), ref) == (
        False,
        "decode step 3 logits differ from the reference cell",
    )
    assert verdict.bit_identical(ref, None) == (False, "no reference cell to compare with")


# --- values shown that contradict the hash --------------------------------------------------------------------------


def _report_verdicts(recs) -> dict:
    from opensci_patch.results import judge

    return {r.cell: (r.status, r.why, r.bit_identical) for r in judge.rows(recs)}


@pytest.mark.parametrize("edit", ["target", "topk", "greedy", "fp64"])
def test_a_record_whose_shown_values_differ_from_the_reference_never_passes_on_its_hash(edit: str):
    import test_report as tr

    from opensci_patch.measure import records

    ref, rec = tr.ok(tr.REF_VERSION), tr.ok("5.2.0")  # the same logits_sha256
    ref.reference = rec.reference = records.Fp64Reference("float64", 3.4e-6, 14.5)
    if edit == "target":
        rec.target = replace(rec.target, logit=99.0)
    elif edit == "topk":
        rec.topk = tuple(replace(t, logit=t.logit + 5.0) for t in rec.topk)
    elif edit == "greedy":
        rec.generation = replace(rec.generation, text=" Berlin.")
    else:
        rec.reference = replace(rec.reference, max_abs_diff=1e-12)
    status, why, bit_identical = _report_verdicts([ref, rec])[tr.vid("5.2.0")]
    assert status == "FAIL" and "contradicts itself" in why and bit_identical is False
    assert _report_verdicts([ref, tr.ok("5.2.0")])[tr.vid("5.2.0")][0] == "pass"  # unedited: still a pass

