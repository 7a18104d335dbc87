"""The code the patches insert (opensci_patch/rewrite/templates/*.py) is real Python: each file imports on its own,
here and (crossversion) on every pinned release it runs on, and each section parses as the patches parse it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import libcst as cst
import pytest

from opensci_patch.rewrite import templates

FILES = sorted(p.stem for p in Path(templates.__file__).parent.glob("*.py") if p.stem != "__init__")


def test_every_template_file_names_its_releases():
    assert FILES and set(FILES) == set(templates.RELEASES)


@pytest.mark.parametrize("file", FILES)
def test_template_imports_on_its_own(file):
    """A fresh interpreter imports the file (its header's imports and every section's definitions)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    module = f"opensci_patch.rewrite.templates.{file}"
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("file", FILES)
def test_sections_parse_and_leave_out_the_header(file):
    code = templates.sections(file)
    assert code, f"{file} has no `# --- template: NAME ---` section"
    header = Path(templates.__file__).with_name(f"{file}.py").read_text().split("# --- template:")[0]
    for name, text in code.items():
        assert text.startswith("\n") and text.endswith("\n") and not text.endswith("\n\n"), name
        assert "# --- template:" not in text and not text.startswith(header.strip()[:40]), name
        cst.parse_module(text)  # as `inserts.template` does


def test_section_reads_between_markers(tmp_path, monkeypatch):
    """The text from below a marker to the next one, blank lines at both ends dropped."""
    (tmp_path / "demo.py").write_text('"""doc"""\n\nimport os\n\n\n# --- template: a ---\nx = 1\n\n\n'
                                      "# --- template: b ---\n\ndef f():\n    return os\n\n")  # fmt: skip
    monkeypatch.setattr(templates.resources, "files", lambda package: tmp_path)
    templates.sections.cache_clear()
    try:
        assert templates.sections("demo") == {"a": "\nx = 1\n", "b": "\ndef f():\n    return os\n"}
    finally:
        templates.sections.cache_clear()


@pytest.mark.crossversion
def test_templates_import_on_their_releases():
    """One python process per pinned release imports every template file that runs on it."""
    from opensci_patch.matrix.envs import ensure_env, run_python

    releases: dict[str, list[str]] = {}
    for file, targets in templates.RELEASES.items():
        for release in targets:
            releases.setdefault(release, []).append(f"opensci_patch.rewrite.templates.{file}")
    script = "import importlib, json, sys\nfor m in json.loads(sys.argv[1]): importlib.import_module(m)\nprint('ok')"
    failed = {}
    for release, modules in sorted(releases.items()):
        proc = run_python(ensure_env(release, "system", log=lambda *a: None), ["-c", script, json.dumps(modules)])
        if proc.returncode != 0 or proc.stdout.strip() != "ok":
            failed[release] = proc.stderr[-2000:]
    assert not failed, failed


def test_patches_import_no_template_module():
    """The patches read the templates as text: importing the patches imports no template module (no torch)."""
    code = "import sys, opensci_patch.rewrite.patches; print(sorted(m for m in sys.modules if '.templates.' in m))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
