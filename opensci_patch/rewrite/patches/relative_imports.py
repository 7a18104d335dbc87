"""relative_imports: a file written inside transformers' tree imports the library by package-relative names.

A modeling file vendored from `transformers/models/<name>/`, or the modular converter's raw output,
imports `from ...activations import ACT2FN` and `from ..llama.modeling_llama import LlamaMLP`. As
remote code it is a module of the HF modules cache, not of transformers, and every release fails to
load it (`check_imports` looks for a sibling file `..cache_utils.py`: No such file or directory).

Detects: `from .X`, `from ..X`, `from ...X` imports anywhere in the file, read against the file's
notional package `transformers/models/<name>/`: one dot is a sibling module of the checkpoint (its
`configuration_<name>.py`) and stays local; two dots are `transformers.models`; three dots are
`transformers`. More dots (above the library) are refused, and so is a target module that no supported
release has: it must be a module of the installed transformers (its files, nothing imported) or one
of `ELSEWHERE`, modules that supported releases other than the installed one have.
Rewrites: each two- and three-dot import to `from transformers.<...> import`, the same names, one
marker above the first.
Verifies: no two- or three-dot import is left, and the marker is there (else "not applicable").
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from pathlib import Path

import libcst as cst

from opensci_patch.rewrite.patches.base import Patch, State, Unrecognised
from opensci_patch.rewrite.patches.inserts import MARKER, with_marker
from opensci_patch.rewrite.patches.syntax import code, full_name
from opensci_patch.rewrite.patches.tree_walk import find_all, visit_statements

NAME = "relative_imports"
WHY = "remote code is loaded outside the transformers package"
PACKAGES = {2: "transformers.models", 3: "transformers"}  # dots -> the package they name, from transformers/models/x/
# Modules that a supported release (4.48.0..5.25.0) has and another lacks (read in the releases' wheels).
ELSEWHERE = {
    "transformers.modeling_attn_mask_utils": "4.48.0 to 5.23.0",
    "transformers.masking_utils": "4.54.0 and later",
    "transformers.modeling_layers": "4.54.0 and later",
    "transformers.tokenization_utils": "4.x",
    "transformers.tokenization_utils_fast": "4.x",
}


def _dots(node: cst.ImportFrom) -> int:
    return len(node.relative)


def absolute(node: cst.ImportFrom) -> str:
    """The module a two- or three-dot import names, e.g. `transformers.activations`."""
    package = PACKAGES.get(_dots(node))
    if package is None:
        raise Unrecognised(f"`{code(node)}` climbs above the transformers package")
    return f"{package}.{full_name(node.module)}" if node.module is not None else package


@functools.cache
def installed() -> tuple[str | None, Path | None]:
    """(version, package folder) of the installed transformers, found without importing it."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None, None
    return importlib.metadata.version("transformers"), Path(list(spec.submodule_search_locations)[0])


def _exists(module: str) -> bool:
    if module in ELSEWHERE:
        return True
    _, folder = installed()
    if folder is None:
        return False
    path = folder.joinpath(*module.split(".")[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _check(node: cst.ImportFrom) -> None:
    module = absolute(node)
    if not _exists(module):
        version, _ = installed()
        checked = f"transformers {version} (installed)" if version else "no installed transformers"
        raise Unrecognised(
            f"`{code(node)}` names {module}, which {checked} does not have and no other supported release "
            f"is known to have"
        )


def _targets(tree: cst.Module) -> list[cst.ImportFrom]:
    return find_all(tree, cst.ImportFrom, lambda n: _dots(n) >= 2)


def _marked(tree: cst.Module) -> bool:
    """The marker above a statement (above the first one, libcst reads it as the module's header)."""
    lines = [*tree.header, *(line for stmt in find_all(tree, cst.SimpleStatementLine) for line in stmt.leading_lines)]
    return any(line.comment is not None and line.comment.value.startswith(f"{MARKER} {NAME} ") for line in lines)


def inspect(tree: cst.Module) -> State:
    targets = _targets(tree)
    for node in targets:
        _check(node)
    if targets:
        return State.NEEDED
    return State.DONE if _marked(tree) else State.ABSENT


def rewrite(tree: cst.Module) -> cst.Module:
    todo = {id(node) for node in _targets(tree)}
    first = [True]

    class Absolute(cst.CSTTransformer):
        def leave_ImportFrom(self, original: cst.ImportFrom, updated: cst.ImportFrom) -> cst.ImportFrom:
            if id(original) not in todo:
                return updated
            module = cst.parse_expression(absolute(original))
            return updated.with_changes(relative=[], module=module, whitespace_after_from=cst.SimpleWhitespace(" "))

        def leave_SimpleStatementLine(
            self, original: cst.SimpleStatementLine, updated: cst.SimpleStatementLine
        ) -> cst.SimpleStatementLine:
            if first[0] and any(id(small) in todo for small in original.body):
                first[0] = False
                return with_marker(updated, NAME, WHY)
            return updated

    return visit_statements(tree, Absolute(), lambda stmt: find_all(stmt, cst.ImportFrom, lambda n: id(n) in todo))


PATCH = Patch(
    name=NAME,
    order=5,
    description="make `from ...x` / `from ..models.y` imports absolute (`from transformers.x`); "
    "`from .sibling` stays local",
    default=True,
    inspect=inspect,
    rewrite=rewrite,
)
