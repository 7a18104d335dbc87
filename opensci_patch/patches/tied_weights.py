"""tied_weights: `_tied_weights_keys` must be a `{target: source}` dict on transformers 5.x.

A list (`["lm_head.weight"]`) raises in `post_init` on every 5.x when the config ties the
embeddings; the dict form also works on 4.48 and 4.57, where iterating it yields the same keys.

Detects: a class attribute `_tied_weights_keys = [...]` (list or tuple of strings).
Rewrites: it to a dict mapping each key to the input-embedding weight, derived from the code:
in that class's `__init__`, the attribute holding the base model (`self.model = XModel(config)`
with `XModel` defined in this file) and, in `XModel.__init__`, the attribute that is an
`nn.Embedding` -> `"model.embed_tokens.weight"`. Nothing is hard-coded, so other class and
attribute names work; an ambiguous or missing derivation is an error, not a guess.
Also: transformers before 4.54 ties through the model's `get_input_embeddings` /
`get_output_embeddings`; a modular-generated file inherits those from 4.54's base class and does
not define them, so on 4.48 `lm_head` stays untied (random). The class that declares one tied key
gets the four accessors it lacks, read off that key (`lm_head.weight` <- `model.embed_tokens.weight`).
Verifies: every `_tied_weights_keys` is a dict of string literals, and a class with one tied
key defines the four accessors.
"""

from __future__ import annotations

import json

import libcst as cst

from .base import (
    Patch,
    State,
    Unrecognised,
    code,
    full_name,
    is_string,
    method,
    self_assignments,
    template,
    top_level_def,
    with_marker,
)

NAME = "tied_weights"
ATTRIBUTE = "_tied_weights_keys"
WHY = "transformers 5.x needs {target: source}"
WHY_ACCESSORS = "transformers < 4.54 ties lm_head through these accessors"
ACCESSORS = """
class _Template:
    def get_input_embeddings(self):
        return self.{source}

    def set_input_embeddings(self, value):
        self.{source} = value

    def get_output_embeddings(self):
        return self.{target}

    def set_output_embeddings(self, new_embeddings):
        self.{target} = new_embeddings
"""


def _declarations(tree: cst.Module) -> list[tuple[cst.ClassDef, cst.BaseExpression]]:
    """(class, value) for each class-level `_tied_weights_keys = value`."""
    found = []
    for cls in (s for s in tree.body if isinstance(s, cst.ClassDef)):
        for stmt in cls.body.body:
            if not isinstance(stmt, cst.SimpleStatementLine):
                continue
            for small in stmt.body:
                if isinstance(small, cst.Assign) and any(full_name(t.target) == ATTRIBUTE for t in small.targets):
                    found.append((cls, small.value))
                elif isinstance(small, cst.AnnAssign) and full_name(small.target) == ATTRIBUTE and small.value:
                    found.append((cls, small.value))
    return found


def _string_list(value: cst.BaseExpression) -> list[str] | None:
    if isinstance(value, (cst.List, cst.Tuple)) and all(
        isinstance(e, cst.Element) and is_string(e.value) for e in value.elements
    ):
        return [e.value.evaluated_value for e in value.elements]
    return None


def _is_string_dict(value: cst.BaseExpression) -> bool:
    return isinstance(value, cst.Dict) and all(
        isinstance(e, cst.DictElement) and is_string(e.key) and is_string(e.value) for e in value.elements
    )


def inspect(tree: cst.Module) -> State:
    declarations = _declarations(tree)
    if not declarations:
        return State.ABSENT
    for cls, value in declarations:
        if _is_string_dict(value):
            if _missing_accessors(cls, value):
                return State.NEEDED
            continue
        if _string_list(value) is None:
            raise Unrecognised(f"{cls.name.value}.{ATTRIBUTE} = {code(value)} is neither a list of names nor a dict")
        return State.NEEDED
    return State.DONE


def _missing_accessors(cls: cst.ClassDef, value: cst.Dict) -> list[cst.FunctionDef]:
    """The embedding accessors `cls` lacks, written for its one tied key (none for other shapes)."""
    if len(value.elements) != 1:
        return []
    element = value.elements[0]
    target, source = element.key.evaluated_value, element.value.evaluated_value
    if not (target.endswith(".weight") and source.endswith(".weight")):
        return []
    text = ACCESSORS.format(target=target[: -len(".weight")], source=source[: -len(".weight")])
    methods = template(text)[0].body.body
    return [m for m in methods if method(cls, m.name.value) is None]


def embedding_source(tree: cst.Module, cls: cst.ClassDef) -> str:
    """`"<base model attr>.<embedding attr>.weight"` for the class that declares the tied keys."""
    classes = {c.name.value: c for c in tree.body if isinstance(c, cst.ClassDef)}
    init = method(cls, "__init__")
    if init is None:
        raise Unrecognised(f"{cls.name.value} declares {ATTRIBUTE} but has no __init__ to find the base model in")
    candidates = []
    for attr, value in self_assignments(init).items():
        callee = full_name(value.func) if isinstance(value, cst.Call) else None
        base = classes.get(callee) if callee else None
        if base is None:
            continue
        embeddings = _embeddings(base)
        if len(embeddings) == 1:
            candidates.append(f"{attr}.{embeddings[0]}.weight")
        elif len(embeddings) > 1:
            raise Unrecognised(f"{base.name.value} has several nn.Embedding attributes ({', '.join(embeddings)})")
    if len(candidates) != 1:
        raise Unrecognised(
            f"cannot tell which input embedding {cls.name.value}.{ATTRIBUTE} ties to "
            f"(found {len(candidates)} base-model attributes holding an nn.Embedding)"
        )
    return candidates[0]


def _embeddings(cls: cst.ClassDef) -> list[str]:
    init = method(cls, "__init__")
    if init is None:
        return []
    return [
        attr
        for attr, value in self_assignments(init).items()
        if isinstance(value, cst.Call) and (full_name(value.func) or "").split(".")[-1] == "Embedding"
    ]


def rewrite(tree: cst.Module) -> cst.Module:
    body = []
    for stmt in tree.body:
        if isinstance(stmt, cst.ClassDef):
            members = [_rewrite_member(tree, stmt, member) for member in stmt.body.body]
            stmt = stmt.with_changes(body=stmt.body.with_changes(body=members))
            stmt = _with_accessors(stmt)
        body.append(stmt)
    return tree.with_changes(body=body)


def _rewrite_member(tree: cst.Module, cls: cst.ClassDef, member: cst.BaseStatement) -> cst.BaseStatement:
    if not isinstance(member, cst.SimpleStatementLine):
        return member
    body, changed = [], False
    for small in member.body:
        if isinstance(small, cst.Assign):
            target: cst.BaseExpression | None = small.targets[0].target
        else:
            target = small.target if isinstance(small, cst.AnnAssign) else None
        keys = _string_list(small.value) if target is not None and full_name(target) == ATTRIBUTE else None
        if keys is not None:
            source = embedding_source(tree, cls) if keys else ""
            pairs = [cst.DictElement(_literal(key), _literal(source)) for key in keys]
            small = small.with_changes(value=cst.Dict(pairs))
            changed = True
        body.append(small)
    return with_marker(member.with_changes(body=body), NAME, WHY) if changed else member


def _with_accessors(cls: cst.ClassDef) -> cst.ClassDef:
    declared = _declarations(cst.Module(body=[cls]))
    missing = [m for c, value in declared if _is_string_dict(value) for m in _missing_accessors(c, value)]
    if not missing:
        return cls
    added = top_level_def([m.with_changes(leading_lines=[cst.EmptyLine(indent=False)]) for m in missing], 1, NAME,
                          WHY_ACCESSORS)  # fmt: skip
    return cls.with_changes(body=cls.body.with_changes(body=[*cls.body.body, *added]))


def _literal(text: str) -> cst.SimpleString:
    return cst.SimpleString(json.dumps(text))


PATCH = Patch(
    name=NAME,
    description="turn _tied_weights_keys from a list into the {target: source} dict transformers 5.x requires",
    default=True,
    inspect=inspect,
    rewrite=rewrite,
)
