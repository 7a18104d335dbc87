"""The package stays readable in pieces: no module over 450 lines, no function over 80 (issue 18's bounds).

Counted on the source as written (`end_lineno - lineno + 1` of each def, nested ones included); the shipped and
third-party model files under `opensci_patch/data/` are data, not ours to split.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "opensci_patch"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _sources(root: Path = PACKAGE) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "data" not in p.relative_to(root).parts)


def too_long(root: Path = PACKAGE) -> list[str]:
    found = []
    for path in _sources(root):
        text = path.read_text()
        if (lines := len(text.splitlines())) > MAX_MODULE_LINES:
            found.append(f"{path.relative_to(root)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (length := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {length} lines")
    return found


def test_the_shape_check_sees_a_long_function_and_a_long_module(tmp_path: Path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def f():\n{body}\n" + "\n" * MAX_MODULE_LINES)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "model.py").write_text("\n" * 1000)
    assert too_long(tmp_path) == ["long.py: 531 lines", f"long.py:1 f: {MAX_FUNCTION_LINES + 1} lines"]


def test_no_module_or_function_is_too_long():
    assert too_long() == []
