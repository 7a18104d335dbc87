"""The llama-research test checkpoint (opensci_patch.fixtures.own) hotfixed with a chosen set of patches,
and captured on the installed transformers or on a release's env: what the issue-19 patch tests measure."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli

from opensci_patch.fixtures.own import build_llama_research
from opensci_patch.rewrite.patches import apply_patches, default_patches

MODELING = "modeling_research_llama.py"


def research_checkpoint(out: Path, *, without: tuple[str, ...] = (), patched: bool = True) -> Path:
    """The checkpoint at `out`, its model file hotfixed with the default patches but `without` (or unpatched)."""
    build_llama_research(out)
    if patched:
        modeling = out / MODELING
        chosen = [p for p in default_patches() if p.name not in without]
        modeling.write_text(apply_patches(modeling.read_text(), chosen, MODELING)[0])
    return out


def capture_here(model: Path, out: Path) -> dict:
    """`opensci-patch capture` with the installed transformers (own process and modules cache)."""
    proc = run_cli("capture", str(model), "--out", str(out), "--quiet")
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(out.read_text())


def capture_on(version: str, model: Path, out: Path) -> dict:
    """`opensci-patch capture` in the env of transformers `version` (built on first use, then reused)."""
    from opensci_patch.matrix.envs import ensure_env, run_python

    env = ensure_env(version, "system", log=lambda *a: None)
    proc = run_python(
        env, ["-m", "opensci_patch.cli", "capture", str(model), "--out", str(out), "--quiet"], timeout=600
    )
    assert proc.returncode in (0, 1), proc.stderr
    record = json.loads(out.read_text())
    assert record["environment"]["transformers"] == version
    return record


def same_numerics(a: dict, b: dict) -> bool:
    """Bit-identical first logits, decode steps and greedy tokens."""
    return (
        a["status"] == b["status"] == "ok"
        and a["logits_sha256"] == b["logits_sha256"]
        and a["generation"]["step_logits_sha256"] == b["generation"]["step_logits_sha256"]
        and a["generation"]["ids"] == b["generation"]["ids"]
    )
