"""hotfix and hotfix --check on hostile model dirs: one line and exit 2, the same refusals in both, nothing written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import FIXTURE_DIR

from opensci_patch._util.errors import ModelDirError
from opensci_patch.rewrite.hotfix import hotfix


def _one_line_exit_2(proc, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "RecursionError" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """The shipped checkpoint's code and config with a small stand-in weights file."""
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    for name in ("config.json", "configuration_opensci.py", "modeling_opensci.py"):
        shutil.copy(FIXTURE_DIR / name, model)
    (model / "model.safetensors").write_bytes(os.urandom(50_000))
    return model


def _append(path: Path, text: str) -> int:
    """Append `text` on a new line of `path`; returns the line number it starts at."""
    before = path.read_text()
    path.write_text(before + "\n" + text)
    return before.count("\n") + 2


# --- a file libcst cannot handle ----------------------------------------------------------------------------------


@pytest.mark.parametrize("check", [False, True], ids=["run", "check"])
def test_an_expression_too_deep_for_libcst_is_one_line_naming_file_and_line(src: Path, cli, check: bool):
    modeling = src / "modeling_opensci.py"
    line = _append(modeling, "_BIG = " + "+".join(["1"] * 600) + "\n")
    compile(modeling.read_text(), str(modeling), "exec")  # Python itself takes it
    proc = cli("hotfix", str(src), *(["--check"] if check else []))
    _one_line_exit_2(proc, "modeling_opensci.py", f"line {line}")
    assert sorted(p.name for p in src.parent.iterdir()) == ["m"]  # no output, no partial dir, no lock


def test_a_nesting_pythons_parser_refuses_is_one_line_and_never_reaches_libcst(src: Path, cli):
    """libcst's native parser crashes the process (SIGSEGV) on some nestings Python refuses, e.g. 5,000 parens."""
    modeling = src / "modeling_opensci.py"
    line = _append(modeling, "_DEEP = " + "(" * 5000 + "1" + ")" * 5000 + "\n")
    _one_line_exit_2(cli("hotfix", str(src), "--check"), "modeling_opensci.py", f"syntax error at line {line},")


def test_deeply_nested_elifs_are_refused_by_the_api_with_a_model_dir_error(src: Path):
    modeling = src / "modeling_opensci.py"
    chain = "if _X:\n    pass\n" + "".join(f"elif _X == {i}:\n    pass\n" for i in range(1500))
    _append(modeling, chain)
    with pytest.raises(ModelDirError, match=r"modeling_opensci\.py: line \d+: .*nested too deeply"):
        hotfix(src, check=True, log=lambda _: None)
