"""Fault injection: hotfix and env builds killed (SIGKILL, SIGINT) at seeded points, then run again.

Invariants after every kill: SRC is unchanged; DST is absent or complete (a valid manifest whose
hashes match every file), and an earlier output replaced with --force is either still the old one
or the new one; the next run succeeds and leaves nothing behind (no partial, old, lock or trash
entries). Kills come at named points (`faults.fault_point`, via $OPENSCI_PATCH_FAULT: deterministic)
and, for hotfix, also at a chunk of the copy drawn from the seed (`hotfix.chunk#N`: between the named points).

A few seeds run by default; OPENSCI_PATCH_FAULT_SEEDS=50 runs 50 (nightly).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from opensci_patch._util import faults, locations
from opensci_patch._util.defaults import FIXTURE_DIR, MANIFEST
from opensci_patch.matrix import envs
from opensci_patch.rewrite.hashed_copy import CHUNK

REPO = Path(__file__).resolve().parents[1]
FIXTURE = FIXTURE_DIR
SEEDS = range(int(os.environ.get("OPENSCI_PATCH_FAULT_SEEDS", "3")))
HOTFIX_POINTS = ("hotfix.started", "hotfix.copied", "hotfix.manifest", "hotfix.swap")
ENV_POINTS = ("env.created", "env.installing", "env.installed", "env.marker")
SIGNALS = ("SIGKILL", "SIGINT")
VERSION = "4.48.0"

needs_torch = pytest.mark.skipif(
    not any(d.metadata["Name"] == "torch" for d in metadata.distributions()), reason="no torch in this interpreter"
)


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def _child_env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", faults.FAULT_VAR)}
    env["PYTHONPATH"] = str(REPO)
    if fault:
        env[faults.FAULT_VAR] = fault
    return env


def _hotfix(src: Path, dst: Path, *, force: bool, fault: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "opensci_patch.cli", "hotfix", str(src), "--out", str(dst)] + ["--force"] * force
    return subprocess.Popen(cmd, env=_child_env(fault), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _complete(dst: Path) -> dict[str, str]:
    """DST holds a valid manifest whose output hashes match exactly the files there; returns the tree."""
    manifest = json.loads((dst / MANIFEST).read_text())
    assert manifest["tool"] == "opensci-patch"
    files = {k: v for k, v in _tree(dst).items() if v != "dir" and k != MANIFEST}
    assert files == {path: entry["sha256_out"] for path, entry in manifest["files"].items()}
    return files


@pytest.fixture
def src(tmp_path: Path) -> Path:
    model = tmp_path / "models" / "src"
    shutil.copytree(FIXTURE, model)
    (model / "weights.bin").write_bytes(os.urandom(32 << 20))  # a copy long enough to be killed in
    return model


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["named-point", "seeded-chunk"])
def test_killed_hotfix_leaves_src_and_dst_whole_and_the_next_run_cleans_up(src: Path, seed: int, mode: str):
    rng = random.Random(f"{seed}:{mode}")
    replacing = rng.random() < 0.5
    sig = rng.choice(SIGNALS)
    parent, dst = src.parent, src.parent / "out"
    if replacing:
        first = _hotfix(src, dst, force=False)
        assert first.wait(timeout=300) == 0, first.communicate()[1]
        manifest = json.loads((dst / MANIFEST).read_text())
        (dst / MANIFEST).write_text(json.dumps({**manifest, "test_mark": "old"}))  # tells the old output from a new one
        old = _tree(dst)
    src_before = _tree(src)

    if mode == "named-point":
        points = HOTFIX_POINTS if replacing else HOTFIX_POINTS[:3]  # the swap point only exists when replacing
        proc = _hotfix(src, dst, force=True, fault=f"{rng.choice(points)}:{sig}")
        proc.wait(timeout=300)
    else:  # midway through the copy: at a chunk drawn from the seed (no timer: the same point on every machine)
        chunks = sum(-(-f.stat().st_size // CHUNK) for f in src.iterdir() if f.suffix != ".py")
        proc = _hotfix(src, dst, force=True, fault=f"hotfix.chunk#{rng.randint(1, chunks)}:{sig}")
        proc.wait(timeout=300)
    what = f"seed {seed}, {mode}, {sig}, {'replacing' if replacing else 'fresh'}: rc {proc.returncode}"

    assert _tree(src) == src_before, what
    if dst.exists():
        _complete(dst)
        if json.loads((dst / MANIFEST).read_text()).get("test_mark") == "old":  # the old output, untouched
            assert _tree(dst) == old, what
    else:
        assert not replacing or proc.returncode != 0, what
    if sig == "SIGINT":  # Ctrl-C: handled (130) and cleaned up; or it came too late (0, or -2 at exit)
        assert proc.returncode in (0, 130, -signal.SIGINT), what
        if proc.returncode == 130:
            assert [p.name for p in parent.iterdir() if p.name.startswith(".")] == [], what

    again = _hotfix(src, dst, force=True)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, f"{what}; next run: {err}"
    _complete(dst)
    assert "test_mark" not in json.loads((dst / MANIFEST).read_text()), what
    assert sorted(p.name for p in parent.iterdir()) == ["out", "src"], what  # no leftovers
    assert _tree(src) == src_before, what


# An env build in a child process, the real envs logic around installers that take milliseconds: the
# "venv" makes the directory layout, the "install" starts a writer (like uv, dying with its driver through
# envs' own PR_SET_PDEATHSIG setter) and waits for it; the probe reports the expected versions.
ENV_DRIVER = """
import json, subprocess, sys
from importlib import metadata
from pathlib import Path
from opensci_patch._util import faults, procs
from opensci_patch.matrix import envs, venv

WRITER = (
    "import sys, time, pathlib\\n"
    "for i in range(40):\\n    pathlib.Path(sys.argv[1], f'f{i}.py').write_text('')\\n    time.sleep(0.005)"
)

def run_installer(cmd, cwd, name):
    if "venv" in cmd:
        path = Path(cmd[-1])
        venv.site_packages(path).mkdir(parents=True, exist_ok=True)
        venv.venv_python(path).parent.mkdir(parents=True, exist_ok=True)
        venv.venv_python(path).symlink_to(sys.executable)
        return
    site = venv.site_packages(Path(cmd[cmd.index("--python") + 1]).parents[1])
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(site)], preexec_fn=procs.death_signal_setter())
    faults.fault_point("env.installing")
    writer.wait()

def versions(env):
    return {"python": sys.version.split()[0], "torch": metadata.version("torch"), "transformers": sys.argv[2],
            "torch_available": True}

procs.find_uv = lambda: "uv"
procs.run_installer = run_installer
envs.installed_versions = versions
env = envs.ensure_env(sys.argv[2], "system", root=Path(sys.argv[1]), log=lambda m: None)
print(json.dumps({"reused": env.reused}))
"""


def _build_env(root: Path, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", ENV_DRIVER, str(root), VERSION],
        env=_child_env(fault),
        capture_output=True,
        text=True,
        timeout=300,
    )


@needs_torch
@pytest.mark.parametrize("seed", SEEDS)
def test_killed_env_build_is_rebuilt_by_the_next_run_and_leaves_nothing(tmp_path: Path, seed: int):
    rng = random.Random(f"{seed}:env")
    point, sig = rng.choice(ENV_POINTS), rng.choice(SIGNALS)
    root = tmp_path / "envs"
    killed = _build_env(root, f"{point}:{sig}")
    what = f"seed {seed}: {point}:{sig}, rc {killed.returncode}"
    assert killed.returncode != 0, what
    path = root / envs.env_name(VERSION, "system")
    assert not (path / locations.MARKER).exists(), what  # never a marker on a half-made env
    if sig == "SIGINT":  # Ctrl-C removes what it made
        assert not path.exists(), what

    again = _build_env(root)
    assert again.returncode == 0, f"{what}; next run: {again.stderr[-2000:]}"
    assert json.loads(again.stdout.splitlines()[-1]) == {"reused": False}, what
    marker = json.loads((path / locations.MARKER).read_text())
    assert (marker["transformers"], marker["torch_build"]) == (VERSION, "system"), what
    leftovers = [p.name for p in root.iterdir() if p.name.startswith((".trash-", ".tmp-", "._torch-"))]
    assert leftovers == [], what
    assert json.loads(_build_env(root).stdout.splitlines()[-1]) == {"reused": True}, what


# --- matrix cells: a killed driver never leaves the previous run's record looking current ------------------


def _cli(*args: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "opensci_patch.cli", *args]
    return subprocess.run(cmd, env=_child_env(fault), capture_output=True, text=True, timeout=900)


@pytest.mark.crossversion  # runs cells
@pytest.mark.parametrize("signame", ["SIGKILL", "SIGINT"])
def test_a_killed_cell_run_leaves_no_stale_record_and_the_report_refuses(tmp_path: Path, signame: str):
    from opensci_patch.measure import records

    recs, results = tmp_path / "records", tmp_path / "results"
    cell_args = ["cell", "--transformers", "4.48.0", "--torch", "system", "--records", str(recs)]
    cell_args += ["--variant", "original", "--variant", "patched"]
    first = _cli(*cell_args)
    assert first.returncode == 0, first.stderr
    before = {p.name: records.load(p) for p in recs.glob("*.json")}
    assert len(before) == 2 and _cli("report", "--records", str(recs), "--results", str(results)).returncode == 0

    killed = _cli(*cell_args, fault=f"cell.cleared:{signame}")  # killed before any cell finished
    assert killed.returncode != 0
    assert list(recs.glob("*.json")) == []  # no record of the previous run is left looking current
    report = _cli("report", "--records", str(recs), "--results", str(results))
    assert report.returncode == 2 and "no cell records" in report.stderr  # nothing to report is refused

    assert _cli(*cell_args).returncode == 0  # the next run writes them again
    assert {p.name for p in recs.glob("*.json")} == set(before)
    assert _cli("report", "--records", str(recs), "--results", str(results)).returncode == 0


def test_a_fault_point_with_a_count_fires_at_that_hit_only():
    code = (
        "from opensci_patch._util.faults import fault_point\n"
        "for i in range(5):\n print(i, flush=True); fault_point('x')"
    )
    env = _child_env("x#3:SIGKILL")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and proc.stdout.split() == ["0", "1", "2"], proc.stderr
