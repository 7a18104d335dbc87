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
Also: transformers 5.3.0 (only that release) drops a tied key the checkpoint lacks from the
missing keys when the model is remote code: `mark_tied_weights_as_initialized` flags every tied
target `_is_hf_initialized`, then, for `is_remote_code()` classes, removes from
`loading_info.missing_keys` every key whose tensor carries that flag, the tied targets it has just
flagged included. `tie_weights` then sees `lm_head.weight` as loaded ("both are present in the
checkpoints, so we will NOT tie them"), pops it from `all_tied_weights_keys`, and it stays on the
meta device. The same happens to transformers' own Qwen3ForCausalLM once `_auto_class` is set, as
`trust_remote_code` loading sets it; 5.4.0 keeps keys that are in `all_tied_weights_keys`. The
class that declares tied keys gets an override that puts the missing tied keys back after the
upstream method, which is the 5.4 behaviour; on 5.0-5.2 (no argument), 5.4+ (nothing removed) and
4.x (never called) it changes nothing.
Verifies: every `_tied_weights_keys` is a dict of string literals, a class with one tied key
defines the four accessors, and a class with tied keys defines the override, exactly as written
here (a different method of that name is refused: it may not keep the tie).
"""

from __future__ import annotations

import json

import libcst as cst

from opensci_patch.rewrite.patches.base import Patch, State, Unrecognised
from opensci_patch.rewrite.patches.inserts import (
    template_members,
    template_shape,
    top_level_def,
    with_block,
    with_marker,
)
from opensci_patch.rewrite.patches.syntax import code, full_name, is_string, method, method_shape, self_assignments

NAME = "tied_weights"
ATTRIBUTE = "_tied_weights_keys"
WHY = "transformers 5.x needs {target: source}"
WHY_ACCESSORS = "transformers < 4.54 ties lm_head through these accessors"
WHY_GUARD = "transformers 5.3.0 forgets the missing tied keys of remote code"
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
GUARD_NAME = "mark_tied_weights_as_initialized"
GUARD = '''
class _Template:
    def mark_tied_weights_as_initialized(self, *args, **kwargs):
        """Keep the tied keys the checkpoint lacks in `missing_keys`, so that `tie_weights` ties them.

        transformers 5.3.0 drops every flagged key from a remote-code model's missing keys, the tied
        targets this method has just flagged included: `lm_head.weight` then counts as loaded, is not
        tied and stays on the meta device. 5.4 keeps them; this does the same on 5.3.0.
        """
        loading_info = args[0] if args else kwargs.get("loading_info")
        tied = set(getattr(self, "all_tied_weights_keys", None) or ())
        missing_tied = tied & set(getattr(loading_info, "missing_keys", None) or ())
        super().mark_tied_weights_as_initialized(*args, **kwargs)
        if missing_tied:
            loading_info.missing_keys = set(loading_info.missing_keys) | missing_tied
'''


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
    """NEEDED while any declaration is a list or its class lacks an accessor or the 5.3.0 guard.

    Every declaration is checked before answering, so a refused one is reported even when another
    class still needs the rewrite."""
    declarations = _declarations(tree)
    if not declarations:
        return State.ABSENT
    needed = False
    for cls, value in declarations:
        if _is_string_dict(value):
            needed |= bool(_missing_accessors(cls, value)) or _needs_guard(cls, value)
        elif _string_list(value) is None:
            raise Unrecognised(f"{cls.name.value}.{ATTRIBUTE} = {code(value)} is neither a list of names nor a dict")
        else:
            needed = True
    return State.NEEDED if needed else State.DONE


def _missing_accessors(cls: cst.ClassDef, value: cst.Dict) -> list[cst.FunctionDef]:
    """The embedding accessors `cls` lacks, written for its one tied key (none for other shapes)."""
    if len(value.elements) != 1:
        return []
    element = value.elements[0]
    target, source = element.key.evaluated_value, element.value.evaluated_value
    if not (target.endswith(".weight") and source.endswith(".weight")):
        return []
    text = ACCESSORS.format(target=target[: -len(".weight")], source=source[: -len(".weight")])
    return [m for m in template_members(text) if method(cls, m.name.value) is None]


def _needs_guard(cls: cst.ClassDef, value: cst.Dict) -> bool:
    """Whether `cls`, which ties keys, still lacks the 5.3.0 override; a foreign override is refused."""
    if not value.elements:
        return False
    own = method(cls, GUARD_NAME)
    if own is None:
        return True
    if method_shape(own) != template_shape(GUARD):
        raise Unrecognised(
            f"{cls.name.value} defines its own {GUARD_NAME}, which may drop the tie on transformers 5.3.0; "
            "make it call super() and put the missing tied keys back into loading_info.missing_keys"
        )
    return False


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
    def fixed(stmt: cst.BaseStatement) -> cst.BaseStatement:
        if not isinstance(stmt, cst.ClassDef):
            return stmt
        return _with_methods(with_block(stmt, [_rewrite_member(tree, stmt, member) for member in stmt.body.body]))

    return tree.with_changes(body=[fixed(stmt) for stmt in tree.body])


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


def _with_methods(cls: cst.ClassDef) -> cst.ClassDef:
    """`cls` with the accessors and the 5.3.0 guard it lacks appended, each group under its marker."""
    declared = [(c, value) for c, value in _declarations(cst.Module(body=[cls])) if _is_string_dict(value)]
    added: list[cst.BaseStatement] = []
    accessors = [m for c, value in declared for m in _missing_accessors(c, value)]
    if accessors:
        spaced = [m.with_changes(leading_lines=[cst.EmptyLine(indent=False)]) for m in accessors]
        added += top_level_def(spaced, 1, NAME, WHY_ACCESSORS)
    if any(_needs_guard(c, value) for c, value in declared):
        added += top_level_def(template_members(GUARD), 1, NAME, WHY_GUARD)
    if not added:
        return cls
    return with_block(cls, [*cls.body.body, *added])


def _literal(text: str) -> cst.SimpleString:
    return cst.SimpleString(json.dumps(text))


PATCH = Patch(
    name=NAME,
    order=60,
    description=(
        "turn _tied_weights_keys from a list into the {target: source} dict transformers 5.x requires, "
        "and keep the tie on 5.3.0"
    ),
    default=True,
    inspect=inspect,
    rewrite=rewrite,
)
