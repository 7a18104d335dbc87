"""Release bisection: the search itself (with a fake cell runner) and one real run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from opensci_patch._util import fs
from opensci_patch._util.errors import OpensciPatchError
from opensci_patch.diagnose import TOLERANCE
from opensci_patch.measure import records
from opensci_patch.measure.records import Record
from opensci_patch.results import bisect as bisect_mod

RELEASES = ["4.55.0", "4.56.0", "4.57.6", "5.0.0", "5.1.0", "5.2.0", "5.3.0"]


def measured(gap: float, dtype: str = "float32", version: str = "5.2.0") -> Record:
    """A finished capture whose logits are `gap` away from the fp64 reference."""
    return Record(
        settings={"dtype": dtype},
        environment={"transformers": version},
        logits_sha256="a" * 64,
        generation=records.Generation((1,), "x", ("a" * 64,), records.KVCheck(True, 1e-4, 0.0, None, "")),
        reference=records.Fp64Reference("float64", gap, 0.0),
    )


def fake_runner(first_bad: str, probed: list[str], *, status: str | None = None):
    def run_cell(cell, model_dir, records_dir, **kwargs) -> Path:
        probed.append(cell.transformers)
        bad = bisect_mod.Version(cell.transformers) >= bisect_mod.Version(first_bad)
        rec = measured(4.7 if bad else 3e-6, version=cell.transformers)
        if status and bad:
            rec = records.error_record(cell, status, "EnvironmentSetupError", "uv: no such release", "log")
        records_dir.mkdir(parents=True, exist_ok=True)
        return fs.write_atomic(records_dir / f"{cell.id}.json", rec)

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


def test_judge_uses_the_fp64_reference_and_diagnose_tolerance():
    for dtype, tol in TOLERANCE.items():
        assert bisect_mod.is_good(measured(tol * 0.9, dtype))[0] is True
        assert bisect_mod.is_good(measured(tol * 1.1, dtype))[0] is False
    failed = records.error_record(_cell("5.0.0"), "load-error", "ImportError", "x", "")
    assert bisect_mod.is_good(failed)[0] is False


def _cell(v: str):
    from opensci_patch.matrix.spec import Cell

    return Cell(v, "cpu", "structural")


@pytest.mark.parametrize("status", ["env-error", "crash", "hotfix-error", "running"])
def test_a_cell_that_could_not_run_stops_the_search_instead_of_counting_as_bad(monkeypatch, tmp_path, status):
    monkeypatch.setattr(bisect_mod, "run_cell", fake_runner("5.0.0", [], status=status))
    with pytest.raises(OpensciPatchError, match=f"cannot judge transformers .*{status}"):
        bisect_mod.bisect("4.55.0", "5.3.0", model_dir=tmp_path, versions=RELEASES, work=tmp_path, log=lambda *a: None)


def test_an_unreadable_record_stops_the_search(monkeypatch, tmp_path):
    def truncated(cell, model_dir, records_dir, **kwargs) -> Path:
        records_dir.mkdir(parents=True, exist_ok=True)
        path = records_dir / "r.json"
        path.write_text(measured(0.0).to_json()[:50])
        return path

    monkeypatch.setattr(bisect_mod, "run_cell", truncated)
    with pytest.raises(records.RecordError, match="truncated"):
        bisect_mod.bisect("4.55.0", "5.3.0", model_dir=tmp_path, versions=RELEASES, work=tmp_path, log=lambda *a: None)


@pytest.mark.parametrize(("good", "bad", "flag"), [("abc", "5.2.0", "--good"), ("4.57.6", "5.x", "--bad")])
def test_a_bad_release_number_is_refused_before_anything_runs(monkeypatch, tmp_path, good, bad, flag):
    def no_index(*a, **k):
        raise AssertionError("listed the package index")

    monkeypatch.setattr(bisect_mod, "released_versions", no_index)
    monkeypatch.setattr(bisect_mod, "run_cell", no_index)
    with pytest.raises(OpensciPatchError, match=f"{flag} '.*' is not a transformers release"):
        bisect_mod.bisect(good, bad, model_dir=tmp_path, work=tmp_path, log=lambda *a: None)


def test_cli_bisect_good_abc_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "opensci_patch.cli",
            "bisect",
            "--good",
            "abc",
            "--bad",
            "5.2.0",
            "--work",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "--good 'abc'" in proc.stderr


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


def test_bisect_lists_releases_from_the_configured_index(monkeypatch):
    """Through `releases` (OPENSCI_PATCH_INDEX_URL), as `opensci-patch releases` does: not PyPI's JSON."""
    from opensci_patch.matrix import releases

    monkeypatch.setenv("OPENSCI_PATCH_INDEX_URL", "https://mirror.example/simple/")
    asked: list[str] = []
    files = [("transformers-5.0.0.tar.gz", False), ("transformers-4.48.0-py3-none-any.whl", False),
             ("transformers-5.1.0rc1-py3-none-any.whl", False), ("transformers-4.49.0.tar.gz", True)]  # fmt: skip
    monkeypatch.setattr(releases, "_project_files", lambda url, timeout, project: asked.append(url) or files)
    assert bisect_mod.released_versions() == ["4.48.0", "5.0.0"]  # no pre-release, nothing only yanked
    assert asked == ["https://mirror.example/simple"]
