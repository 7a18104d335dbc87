"""diagnose's child process speaks the one child protocol (`_util/child.py`), as the capture worker does: steps as
JSON on stdin, one result line per step on stdout; and the driver's errors from it (fast: this interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import FIXTURE_DIR, REPO

from opensci_patch._util import procs
from opensci_patch.diagnose import driver
from opensci_patch.diagnose.stages import MODEL_INFO
from opensci_patch.diagnose.worker import CompareStep, ProbeStep, ReferenceStep, step_from_json, step_to_json

CMD = [sys.executable, "-m", "opensci_patch.diagnose.worker"]


def test_the_diagnose_child_answers_each_json_step_with_one_result_line(tmp_path: Path):
    """A probe of no such dir is bad input (exit 2, one error line); the shipped code fails to load on 5.x: a
    finding (rc 1), recorded in the probe dir it wrote."""
    steps = [ProbeStep(tmp_path / "missing", tmp_path / "p0"), ProbeStep(FIXTURE_DIR, tmp_path / "p1", decode_steps=0)]
    payload = json.dumps([step_to_json(s) for s in steps])
    proc = subprocess.run(CMD, input=payload, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["index"], r["rc"], r["value"]) for r in lines] == [(0, 2, None), (1, 1, None)]
    assert "opensci-patch: error:" in lines[0]["stderr"] and "missing" in lines[0]["stderr"]
    info = json.loads((tmp_path / "p1" / MODEL_INFO).read_text())
    assert info["status"] == "load-error"

    for bad in ("[1, 2", json.dumps([{"kind": "nosuch", "model": "m", "out": "o"}])):
        refused = subprocess.run(CMD, input=bad, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert refused.returncode == 2 and refused.stdout == ""
        assert "not a list of steps" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_diagnose_steps_round_trip_through_json(tmp_path: Path):
    steps = [
        ProbeStep(tmp_path / "m", tmp_path / "o", "bfloat16", "sdpa", "cpu", "Hi", 0),
        ReferenceStep(tmp_path / "m", tmp_path / "r", (1, 2, 3)),
        CompareStep(tmp_path / "a", tmp_path / "b", tmp_path / "c.json", None, ("X", "Y")),
        CompareStep(tmp_path / "a", tmp_path / "b", tmp_path / "c.json", tmp_path / "ref"),
    ]
    assert [step_to_json(s)["kind"] for s in steps] == ["probe", "reference", "compare", "compare"]
    assert [step_from_json(json.loads(json.dumps(step_to_json(s)))) for s in steps] == steps


def test_the_driver_names_the_side_and_the_exit_of_a_failed_or_slow_step(tmp_path: Path):
    side = driver.Side("A", Path(sys.executable), tmp_path / "missing", "this interpreter")
    with pytest.raises(driver.DiagnoseError) as failed:
        driver._probe_side(side, tmp_path / "probe", "Hi", 300, 0)
    first, *rest = str(failed.value).splitlines()
    assert first == "probe for A (this interpreter) failed with exit 2:"
    assert any("opensci-patch: error:" in line and "missing" in line for line in rest)

    with pytest.raises(driver.DiagnoseError, match=r"^probe for A ran over 0 s$"):
        driver._probe_side(side, tmp_path / "probe", "Hi", 0.05, 0)  # killed before its result line


def test_the_driver_reads_a_probe_that_recorded_a_model_failure(tmp_path: Path):
    side = driver.Side("B", Path(sys.executable), FIXTURE_DIR, "this interpreter, the shipped code")
    info = driver._probe_side(side, tmp_path / "probe", "Hi", 300, 0)
    assert info["status"] == "load-error" and info["error"]["type"]


def test_a_terminated_driver_starts_no_diagnose_child(tmp_path: Path, monkeypatch):
    """After SIGTERM (the CLI calls `procs.terminate_children`) no new step starts: diagnose stops with a DiagnoseError,
    as the matrix does."""
    stopping = threading.Event()
    monkeypatch.setattr(procs, "STOPPING", stopping)
    procs.terminate_children()
    side = driver.Side("A", Path(sys.executable), FIXTURE_DIR, "this interpreter")
    with pytest.raises(driver.DiagnoseError, match=r"^probe for A \(this interpreter\) failed with exit -15:"):
        driver._probe_side(side, tmp_path / "probe", "Hi", 300, 0)
    assert stopping.is_set() and not (tmp_path / "probe").exists()
