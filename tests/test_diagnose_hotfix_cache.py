"""diagnose prepares its models through the matrix's hotfix cache: what a sweep or an earlier diagnose of this
same code hotfixed is never hotfixed again.

Every release's env is this interpreter and the comparison itself is stubbed out: only the preparation runs
(real hotfixes, in this process), so no per-release env is built.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from opensci_patch import diagnose as dg
from opensci_patch._util.defaults import FIXTURE_DIR, MANIFEST
from opensci_patch.diagnose import cells
from opensci_patch.matrix import hotfix_cache, runner
from opensci_patch.matrix.envs import Env
from opensci_patch.matrix.spec import Cell

PAIR = (Cell("5.24.0", "cpu", "patched"), Cell("5.24.0", "cpu", "patched+init"))


@pytest.fixture
def prepare_only(monkeypatch, tmp_path: Path) -> dict[str, list]:
    """Envs are this interpreter, compare_sides records the model dirs it was given; returns the sources of
    every hotfix run and those model dirs, per diagnose run."""
    monkeypatch.setattr(
        "opensci_patch.matrix.envs.ensure_env",
        lambda version, build, **kw: Env(tmp_path / "env", Path(sys.executable), version, build, reused=True),
    )
    seen: dict[str, list] = {"hotfixes": [], "models": []}
    real = hotfix_cache.run_hotfix

    def counting(variant: str, source: Path, out: Path):
        seen["hotfixes"].append(source)
        return real(variant, source, out)

    monkeypatch.setattr(hotfix_cache, "run_hotfix", counting)  # the sweep and diagnose both hotfix through it

    def compare_stub(a: dg.Side, b: dg.Side, out_dir: Path, **kw) -> dict:
        seen["models"].append((a.model_dir, b.model_dir))
        assert all((side.model_dir / MANIFEST).is_file() for side in (a, b))  # hotfixed, complete
        return {"status": "agree", "timings": {}}

    monkeypatch.setattr(cells, "compare_sides", compare_stub)
    return seen


def test_a_second_diagnose_of_the_same_pair_runs_no_hotfix(prepare_only, tmp_path: Path):
    root = tmp_path / "env-root"
    dg.diagnose(*PAIR, None, tmp_path / "first", env_root=root, log=lambda *a: None)
    assert prepare_only["hotfixes"] == [FIXTURE_DIR, FIXTURE_DIR]  # one per variant
    cached = tuple(hotfix_cache.hotfix_cache_dir(root, FIXTURE_DIR, c.model) for c in PAIR)  # the matrix's own cache
    assert all((c / MANIFEST).is_file() for c in cached)
    assert not (tmp_path / "first" / "models").exists()  # what the run hotfixed is removed; the cache keeps it

    prepare_only["hotfixes"].clear()
    lines: list[str] = []
    dg.diagnose(*PAIR, None, tmp_path / "second", env_root=root, log=lines.append)
    assert prepare_only["hotfixes"] == []  # fails when diagnose hotfixes what the cache already holds
    assert prepare_only["models"][-1] == cached
    assert sum("hotfix output reused from" in line for line in lines) == 2

    dg.diagnose(*PAIR, None, tmp_path / "kept", env_root=root, keep_models=True, log=lambda *a: None)
    assert prepare_only["hotfixes"] == []  # --keep-models copies the cached outputs under OUT/models
    kept = prepare_only["models"][-1]
    assert all(k.is_relative_to(tmp_path / "kept" / "models") and (k / MANIFEST).is_file() for k in kept)
    assert [(k / "modeling_opensci.py").read_bytes() for k in kept] == [
        (c / "modeling_opensci.py").read_bytes() for c in cached
    ]


def test_diagnose_reuses_what_a_sweep_hotfixed(prepare_only, tmp_path: Path):
    """The sweep (`runner.hotfix_variants`) and diagnose go through one cache front door, `hotfix_cache.hotfix_once`."""
    root = tmp_path / "env-root"
    sweep = runner._Run(tmp_path / "records", tmp_path, root, 300, lambda *a: None, runner._Progress(2, print))
    runner.hotfix_variants(sweep, [(c.checkpoint, c.model) for c in PAIR], {"": FIXTURE_DIR})
    assert len(prepare_only["hotfixes"]) == 2 and all(isinstance(m, Path) for m in sweep.models.values())
    prepare_only["hotfixes"].clear()
    dg.diagnose(*PAIR, None, tmp_path / "diag", env_root=root, log=lambda *a: None)
    assert prepare_only["hotfixes"] == []
    assert prepare_only["models"][-1] == tuple(hotfix_cache.hotfix_cache_dir(root, FIXTURE_DIR, c.model) for c in PAIR)


@pytest.mark.parametrize("variant", ["generated", "qwen3-modular", "llama-research", "era43"])
def test_diagnose_runs_each_own_checkpoint_variant_on_its_own_checkpoint(monkeypatch, variant):
    """The matrix runs `Variant.checkpoint`; diagnose must compare the same model (it once ran `generated` for all)."""
    from opensci_patch.fixtures import generated, own
    from opensci_patch.matrix import envs
    from opensci_patch.matrix.spec import VARIANTS

    monkeypatch.setattr(envs, "ensure_env", lambda release, build, root=None, log=None: (release, build))
    monkeypatch.setattr(generated, "ensure_generated", lambda root=None, log=None: Path("built") / "generated")
    monkeypatch.setattr(own, "ensure_checkpoint", lambda kind, root=None, log=None: Path("built") / kind)
    cell = Cell("4.48.0", "cpu", variant)
    _, runs_on = cells._envs_and_checkpoints([("A", cell)], {"A": Path("source")}, None, lambda m: None)
    assert runs_on["A"] == Path("built") / VARIANTS[variant].checkpoint
