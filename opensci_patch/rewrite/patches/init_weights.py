"""init_weights (opt-in): write `_init_weights` with `torch.nn.init` instead of `.data` methods.

transformers 5.0.0 and 5.1.0 run `_init_weights` on every module after loading. Their only
protection is per tensor: the `torch.nn.init.*` functions skip tensors flagged
`_is_hf_initialized` (the loaded ones), but `module.weight.data.normal_()` bypasses the flag and
wipes the loaded weights. Opt-in because the default set must let the test matrix show that
upstream regression.

Detects: `.data` inside an `_init_weights` method.
Rewrites, statement by statement:
  `X.data.normal_(...)` -> `nn.init.normal_(X, ...)`    `X.data.uniform_(a, b)` -> `nn.init.uniform_(X, a, b)`
  `X.data.zero_()` -> `nn.init.zeros_(X)`               `X.data.fill_(1.0)` -> `nn.init.ones_(X)` (0 -> zeros_,
                                                         other values -> constant_)
  `X.data[i].zero_()` -> `if not getattr(X, "_is_hf_initialized", False): nn.init.zeros_(X[i])`
The slice in the last one is a new tensor without the flag, so the guard cannot see that `X`
was loaded: the explicit check (what upstream 5.x does for the padding row) keeps it; on 4.x
the flag never exists and the row is zeroed as before. Any other use of `.data` is an error.
Verifies: no `.data` left in any `_init_weights`.
"""

from __future__ import annotations

import libcst as cst

from opensci_patch.rewrite.patches.base import Patch, State, Unrecognised
from opensci_patch.rewrite.patches.inserts import with_marker
from opensci_patch.rewrite.patches.syntax import code, full_name
from opensci_patch.rewrite.patches.tree_walk import find_all, visit_statements

NAME = "init_weights"
WHY = "transformers 5.0/5.1 re-run _init_weights after loading; .data bypasses their guard"
FILL = {0.0: "zeros_", 1.0: "ones_"}


def _init_methods(tree: cst.Module) -> list[cst.FunctionDef]:
    return find_all(tree, cst.FunctionDef, lambda f: f.name.value == "_init_weights")


def _data_uses(node: cst.CSTNode) -> int:
    return len(find_all(node, cst.Attribute, lambda a: a.attr.value == "data"))


def _init_prefix(tree: cst.Module) -> str:
    """`nn.init` when the module binds `nn` to torch.nn, else `torch.nn.init`."""
    bound = set()
    for stmt in tree.body:
        for small in stmt.body if isinstance(stmt, cst.SimpleStatementLine) else ():
            if isinstance(small, cst.ImportFrom) and small.module and full_name(small.module) == "torch":
                names = small.names if not isinstance(small.names, cst.ImportStar) else ()
                bound |= {"nn" for a in names if full_name(a.name) == "nn" and a.asname is None}
            if isinstance(small, cst.Import):
                for alias in small.names:
                    if full_name(alias.name) == "torch.nn" and alias.asname and alias.asname.name.value == "nn":
                        bound.add("nn")
                    if full_name(alias.name) == "torch" and alias.asname is None:
                        bound.add("torch")
    if "nn" in bound:
        return "nn.init"
    if "torch" in bound:
        return "torch.nn.init"
    raise Unrecognised("the file imports neither `torch` nor `nn` from torch, which nn.init calls need")


def _replacement(stmt: cst.SimpleStatementLine, init: str) -> cst.BaseStatement | None:
    """The nn.init form of one `.data` statement, None if it is not one the patch knows."""
    if len(stmt.body) != 1 or not isinstance(stmt.body[0], cst.Expr):
        return None
    call = stmt.body[0].value
    if not (isinstance(call, cst.Call) and isinstance(call.func, cst.Attribute)):
        return None
    op, receiver, args = call.func.attr.value, call.func.value, list(call.args)
    if isinstance(receiver, cst.Subscript) and op == "zero_" and not args:
        data = receiver.value
        if isinstance(data, cst.Attribute) and data.attr.value == "data":
            tensor, row = code(data.value), code(receiver.with_changes(value=data.value))
            new = f'if not getattr({tensor}, "_is_hf_initialized", False):\n    {init}.zeros_({row})\n'
            return cst.parse_statement(new).with_changes(leading_lines=stmt.leading_lines)
        return None
    if not (isinstance(receiver, cst.Attribute) and receiver.attr.value == "data"):
        return None
    tensor = cst.Arg(receiver.value)
    if op in ("normal_", "uniform_") and (op == "normal_" or all(a.keyword is None for a in args)):
        new_call = cst.Call(cst.parse_expression(f"{init}.{op}"), [tensor, *args])
    elif op == "zero_" and not args:
        new_call = cst.Call(cst.parse_expression(f"{init}.zeros_"), [tensor])
    elif op == "fill_" and len(args) == 1 and args[0].keyword is None:
        value = args[0].value
        number = float(value.evaluated_value) if isinstance(value, (cst.Integer, cst.Float)) else None
        if number in FILL:
            new_call = cst.Call(cst.parse_expression(f"{init}.{FILL[number]}"), [tensor])
        else:
            new_call = cst.Call(cst.parse_expression(f"{init}.constant_"), [tensor, args[0]])
    else:
        return None
    return stmt.with_changes(body=[stmt.body[0].with_changes(value=new_call)])


def inspect(tree: cst.Module) -> State:
    methods = _init_methods(tree)
    if not methods:
        return State.ABSENT
    return State.NEEDED if any(_data_uses(m) for m in methods) else State.DONE


class _Rewrite(cst.CSTTransformer):
    def __init__(self, init: str) -> None:
        super().__init__()
        self.init = init
        self.depth = 0
        self.marked = False

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        self.depth += node.name.value == "_init_weights"

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        self.depth -= original.name.value == "_init_weights"
        return updated

    def leave_SimpleStatementLine(
        self, original: cst.SimpleStatementLine, updated: cst.SimpleStatementLine
    ) -> cst.BaseStatement:
        if not self.depth or not _data_uses(original):
            return updated
        new = _replacement(original, self.init)
        if new is None:
            raise Unrecognised(f"`{code(original)}` in _init_weights uses .data in a way the patch does not know")
        if not self.marked:
            self.marked = True
            new = with_marker(new, NAME, WHY)
        return new


def rewrite(tree: cst.Module) -> cst.Module:
    methods = _init_methods(tree)
    for func in methods:
        # `.data` in a compound statement header (e.g. `if x.data.any():`) is not a statement we rewrite.
        headers = _data_uses(func) - sum(_data_uses(line) for line in find_all(func, cst.SimpleStatementLine))
        if headers:
            raise Unrecognised("_init_weights uses .data outside a plain statement")
    return visit_statements(tree, _Rewrite(_init_prefix(tree)), _init_methods)


PATCH = Patch(
    name=NAME,
    order=90,
    description="rewrite _init_weights writes through .data to torch.nn.init calls (fixes 5.0/5.1 weight wipes)",
    default=False,
    inspect=inspect,
    rewrite=rewrite,
)
