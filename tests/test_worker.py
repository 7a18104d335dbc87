"""The capture worker's own process rules (the protocol and the runner's use of it: tests/test_runner.py)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from opensci_patch._util import child
from opensci_patch.matrix import worker
from opensci_patch.matrix.spec import Cell, expectation
from opensci_patch.measure import records as rec_io


class _Model:
    """Stands for a loaded model: held in a reference cycle, as module trees are, so only the collector frees it."""

    def __init__(self):
        self.me = self


def test_a_steps_model_in_a_reference_cycle_is_freed_before_the_next_step_starts(tmp_path: Path, monkeypatch, request):
    """The worker collects between steps (peak memory: one model at a time) and keeps only what survives that
    collection out of later ones (gc.freeze): a cycle made by one step is never frozen alive."""
    seen: list[weakref.ref] = []
    alive_at_start: list[bool] = []

    def fake_capture(step):
        alive_at_start.append(any(ref() is not None for ref in seen))
        model = _Model()
        seen.append(weakref.ref(model))
        del model  # the cycle keeps it: refcounting alone cannot free it
        return 0, "", rec_io.error_record(step.cell, "crash", "Fake", "fake", "")

    monkeypatch.setattr(worker, "_run_capture", fake_capture)
    request.addfinalizer(gc.unfreeze)  # this pytest process keeps no frozen heap
    cell = Cell("4.48.0", "cpu", "patched")
    steps = [worker.CaptureStep(tmp_path, cell, tmp_path / f"r{i}.json", expectation(cell)) for i in range(3)]
    assert child.run_steps(steps, worker.capture_step, lambda r: None) == 0
    assert alive_at_start == [False, False, False]
    assert all(ref() is None for ref in seen)
