"""The benchmark scripts start from a clean checkout: they import, parse and refuse bad requests early.

Their figures are measured by running them (benchmarks/README.md), never asserted here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}  # no PYTHONPATH: the scripts find the checkout
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_every_benchmark_script_is_listed_in_the_benchmarks_readme():
    readme = (REPO / "benchmarks" / "README.md").read_text()
    assert SCRIPTS and all(f"`{name}`" in readme for name in SCRIPTS), SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_help_runs_from_any_directory(script, tmp_path):
    proc = _run(str(REPO / "benchmarks" / script), "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:")


def test_decode_benchmark_refuses_to_overwrite_a_table_before_doing_any_work(tmp_path):
    table = tmp_path / "table.md"
    table.write_text("keep me\n")
    proc = _run(str(REPO / "benchmarks" / "decode_1p7b.py"), "--device", "cpu", "--markdown", str(table),
                "--workdir", str(tmp_path / "work"))  # fmt: skip
    assert proc.returncode != 0
    assert "exists; pass --force" in proc.stderr and "Traceback" not in proc.stderr
    assert table.read_text() == "keep me\n"
    assert not (tmp_path / "work").exists()


def test_decode_benchmark_on_cuda_without_a_gpu_says_so(tmp_path):
    from opensci_patch.matrix.spec import gpu_present

    if gpu_present() is None:
        pytest.skip("a GPU is present: the refusal cannot be observed")
    proc = _run(str(REPO / "benchmarks" / "decode_1p7b.py"), "--workdir", str(tmp_path / "work"))
    assert proc.returncode != 0 and "--device cpu" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "work").exists()
