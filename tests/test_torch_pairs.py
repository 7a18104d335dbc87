"""A (transformers, torch) pair outside the release's own torch requirement: an `unsupported-pair` record, never
a crash; the report shows it as its own verdict, outside the exit status. The installed torch is faked here (its
version string, or transformers' `is_torch_available`): no other torch is downloaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import FIXTURE_DIR

from opensci_patch._util.errors import EnvironmentSetupError
from opensci_patch.matrix import envs
from opensci_patch.matrix.spec import Cell
from opensci_patch.measure import records
from opensci_patch.measure.capture import CaptureSettings, capture
from opensci_patch.measure.isolation import isolated_hf_cache
from opensci_patch.measure.records import CellInfo, Expected
from opensci_patch.measure.torch_support import torch_requirement, unsupported_pair
from opensci_patch.results import report

transformers = pytest.importorskip("transformers")
# what transformers 5.25.0's metadata says (`Requires-Dist: torch>=2.6; extra == "torch"`), read by hand
KNOWN = {"5.25.0": "torch>=2.6"}


def run(**options):
    with isolated_hf_cache():
        return capture(CaptureSettings(model=FIXTURE_DIR, **options), log=lambda *a: None)


def test_the_requirement_is_the_releases_own():
    if transformers.__version__ not in KNOWN:
        pytest.skip(f"no hand-read requirement for transformers {transformers.__version__}")
    assert torch_requirement() == KNOWN[transformers.__version__]
    assert unsupported_pair("2.5.1") is not None and KNOWN[transformers.__version__] in unsupported_pair("2.5.1")
    assert unsupported_pair("2.6.0") is None and unsupported_pair("2.13.0+cpu") is None


def test_a_torch_below_the_requirement_is_recorded_as_an_unsupported_pair(monkeypatch):
    import torch

    wanted = torch_requirement()
    if wanted is None or ">=" not in wanted:
        pytest.skip(f"transformers {transformers.__version__} states no torch minimum")
    monkeypatch.setattr(torch, "__version__", "1.0.0")
    rec = run()
    assert rec.status == "unsupported-pair"
    assert rec.error.type == "UnsupportedPair" and wanted in rec.error.message and "1.0.0" in rec.error.message
    assert rec.environment["torch_requirement"] == wanted and rec.environment["torch"] == "1.0.0"
    assert rec.target is None and rec.generation is None  # nothing ran
    assert records.Record.from_dict(json.loads(json.dumps(rec.to_dict()))).status == "unsupported-pair"


def test_transformers_disabling_torch_is_an_unsupported_pair_not_a_crash(monkeypatch):
    from transformers.utils import import_utils

    monkeypatch.setattr(import_utils, "is_torch_available", lambda: False)
    rec = run()
    assert rec.status == "unsupported-pair" and "disables torch" in rec.error.message


CLI = """\
import sys, torch
torch.__version__ = "1.0.0"
from opensci_patch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_capture_writes_the_record_of_an_unsupported_pair(tmp_path):
    """Before: transformers disabled torch, capture died with an ImportError traceback and wrote no record."""
    from opensci_patch._util.procs import child_env

    out = tmp_path / "rec.json"
    proc = subprocess.run([sys.executable, "-c", CLI, "capture", str(FIXTURE_DIR), "--out", str(out), "--quiet"],
                          text=True, capture_output=True, env=child_env(), timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "unsupported-pair" in proc.stderr
    assert json.loads(out.read_text())["status"] == "unsupported-pair"


def test_an_env_whose_transformers_disables_its_torch_is_kept_for_its_records(tmp_path):
    env = envs.Env(tmp_path, tmp_path / "python", "5.25.0", "system", reused=False)
    seen = {"transformers": "5.25.0", "torch": "2.5.1", "torch_available": False}
    with pytest.raises(EnvironmentSetupError, match="is_torch_available"):
        envs._check_installed(env, seen, {"torch": "2.5.1"})
    envs._check_installed(env, {**seen, "unsupported_pair": "transformers 5.25.0 requires torch>=2.6"},
                          {"torch": "2.5.1"})  # fmt: skip


def test_the_report_shows_an_unsupported_pair_as_its_own_verdict_outside_the_exit_status():
    cell = CellInfo.of(Cell("5.25.0", "cpu", "patched"))
    why = "transformers 5.25.0 requires torch>=2.6 (its metadata); this torch is 2.5.1"
    rec = records.error_record(cell, "unsupported-pair", "UnsupportedPair", why, "")
    rec.expected = Expected("pass", "")
    rep = report.build(report.Loaded(records=[rec], sources=["a.json"]), None)
    (row,) = rep.table
    assert row.status == "unsupported-pair" and "torch>=2.6" in row.why
    assert rep.bad == 0
    assert rep.grid[next(iter(rep.grid))]["5.25.0"]["patched"] == "unsupported-pair"


def test_sdpa_that_transformers_refuses_on_this_torch_is_an_unsupported_pair(monkeypatch):
    """Measured: 4.48.0 on torch 2.0.0 raised 'PyTorch SDPA requirements in Transformers are not met' at load, a
    load-error counted as FAIL; it is the pair's fact (4.x's is_torch_sdpa_available(), faked False here)."""
    from transformers.utils import import_utils

    monkeypatch.setattr(import_utils, "is_torch_sdpa_available", lambda: False, raising=False)
    rec = run(attn="sdpa")
    assert rec.status == "unsupported-pair" and "does not run sdpa on torch" in rec.error.message
    assert run(attn="eager").status != "unsupported-pair"  # eager is not affected


def test_logits_hash_the_same_bytes_when_torch_has_no_numpy(monkeypatch):
    """Measured: torch 2.0.0 (built for numpy 1) under numpy 2 crashed every capture ('Numpy is not available')."""
    import torch

    from opensci_patch.measure.capture import logits_sha256

    vectors = [torch.linspace(-3, 3, 1000, dtype=dt) for dt in (torch.float32, torch.bfloat16)]
    want = [logits_sha256(v) for v in vectors]

    def no_numpy(self):
        raise RuntimeError("Numpy is not available")

    monkeypatch.setattr(torch.Tensor, "numpy", no_numpy)
    assert [logits_sha256(v) for v in vectors] == want
