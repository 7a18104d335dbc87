"""Release bisection: the search itself (with a fake cell runner) and one real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opensci_patch import bisect as bisect_mod
from opensci_patch.errors import OpensciPatchError

RELEASES = ["4.55.0", "4.56.0", "4.57.6", "5.0.0", "5.1.0", "5.2.0", "5.3.0"]


def fake_runner(first_bad: str, probed: list[str]):
    def run_cell(cell, model_dir, records, **kwargs) -> Path:
        probed.append(cell.transformers)
        bad = bisect_mod.Version(cell.transformers) >= bisect_mod.Version(first_bad)
        rec = {"status": "ok", "settings": {"dtype": "float32"}, "reference": {"max_abs_diff": 4.7 if bad else 3e-6}}
        records.mkdir(parents=True, exist_ok=True)
        path = records / f"{cell.transformers}.json"
        path.write_text(json.dumps(rec))
        return path

    return run_cell


@pytest.mark.parametrize("first_bad", ["4.56.0", "5.0.0", "5.3.0"])
def test_bisect_finds_the_first_bad_release(monkeypatch, tmp_path, first_bad):
    probed: list[str] = []
    monkeypatch.setattr(bisect_mod, "run_cell", fake_runner(first_bad, probed))
    good, bad, probes = bisect_mod.bisect(
        "4.55.0", "5.3.0", model_dir=tmp_path, versions=RELEASES, work=tmp_path, log=lambda *a: None
    )
    assert bad == first_bad
    assert RELEASES.index(good) == RELEASES.index(bad) - 1
    assert len(set(probed)) == len(probed) <= 5  # log2 search, each release at most once


def test_bisect_refuses_a_good_release_that_is_bad(monkeypatch, tmp_path):
    monkeypatch.setattr(bisect_mod, "run_cell", fake_runner("4.55.0", []))
    with pytest.raises(OpensciPatchError, match="--good 4.55.0 is not good"):
        bisect_mod.bisect("4.55.0", "5.3.0", model_dir=tmp_path, versions=RELEASES, work=tmp_path, log=lambda *a: None)


def test_between_keeps_the_range_and_orders_by_version():
    assert bisect_mod.between(["5.10.0", "5.2.0", "4.57.6", "5.9.0"], "4.57.6", "5.9.0") == ["4.57.6", "5.2.0", "5.9.0"]
    with pytest.raises(OpensciPatchError):
        bisect_mod.between(RELEASES, "5.2.0", "4.57.6")


def test_judge_uses_the_fp64_reference_not_another_release():
    ok = {"status": "ok", "settings": {"dtype": "float32"}, "reference": {"max_abs_diff": 4e-6}}
    off = ok | {"reference": {"max_abs_diff": 0.5}}
    assert bisect_mod.judge(ok)[0] is True
    assert bisect_mod.judge(off)[0] is False
    assert bisect_mod.judge({"status": "load-error", "error": {"type": "ImportError", "message": "x"}})[0] is False


@pytest.mark.crossversion
def test_bisect_names_5_0_as_the_first_release_that_breaks_the_naive_fix(tmp_path):
    from conftest import FIXTURE_DIR

    _, bad, probes = bisect_mod.bisect(
        "4.57.6",
        "5.2.0",
        torch_build="system",
        variant="structural",
        model_dir=FIXTURE_DIR,
        versions=["4.57.6", "5.0.0", "5.1.0", "5.2.0"],
        work=tmp_path,
        log=lambda *a: None,
    )
    assert bad == "5.0.0"
    assert {p.version: p.good for p in probes}["4.57.6"] is True
