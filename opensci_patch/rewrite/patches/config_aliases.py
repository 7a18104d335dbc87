"""config_aliases: a configuration class's own names for the sizes transformers reads by its names.

4.3x-era configuration files (ChatGLM-style, GPT-style) store `self.num_layers`, `self.n_layer`, ... and never
`num_hidden_layers`. The library reads the standard names itself: the `DynamicCache(config=...)` that `generate`
builds on 4.57.6 reads `config.num_hidden_layers` and raises AttributeError for such a config (measured;
4.48.0 builds its cache without the config).

Rewrites: the `PretrainedConfig` subclass gets `attribute_map` entries `{"num_hidden_layers": "num_layers"}`
(the mechanism transformers' own configs use, on every release 4.48.0 .. 5.25.0: reads and writes of the
standard name go to the file's attribute, and `to_dict()` is unchanged), added to its `attribute_map` dict or
as a new class attribute. Only where `__init__` assigns the alias and never the standard name, and the map has
no entry for it. Aliases: num_hidden_layers <- num_layers / n_layer / n_layers, hidden_size <- n_embd,
num_attention_heads <- n_head, max_position_embeddings <- n_positions.

Not applicable to the shipped and generated open-sci files (standard names). Detects: such classes (a class
whose `attribute_map` is not a dict literal is refused). Verifies: each has the entries, on a line with the marker.
"""

from __future__ import annotations

import libcst as cst

from opensci_patch.rewrite.patches.base import Patch, State, Unrecognised
from opensci_patch.rewrite.patches.inserts import MARKER, template, with_block, with_marker
from opensci_patch.rewrite.patches.syntax import code, docstring_offset, full_name, is_string, method, self_assignments

NAME = "config_aliases"
WHY = "transformers reads the standard config names: 4.57's cache reads num_hidden_layers"
ALIASES = {
    "num_hidden_layers": ("num_layers", "n_layer", "n_layers"),
    "hidden_size": ("n_embd",),
    "num_attention_heads": ("n_head",),
    "max_position_embeddings": ("n_positions",),
}
CONFIG_BASES = ("PretrainedConfig", "PreTrainedConfig")


def _map_line(cls: cst.ClassDef) -> tuple[int, cst.SimpleStatementLine] | None:
    """The class-level `attribute_map = ...` statement and its index in the class body."""
    for at, stmt in enumerate(cls.body.body):
        if isinstance(stmt, cst.SimpleStatementLine) and len(stmt.body) == 1:
            small = stmt.body[0]
            targets = [t.target for t in small.targets] if isinstance(small, cst.Assign) else []
            targets += [small.target] if isinstance(small, cst.AnnAssign) else []
            if any(full_name(t) == "attribute_map" for t in targets):
                return at, stmt
    return None


def _mapped(cls: cst.ClassDef) -> dict[str, str]:
    found = _map_line(cls)
    if found is None:
        return {}
    value = found[1].body[0].value
    if not isinstance(value, cst.Dict) or not all(
        isinstance(e, cst.DictElement) and is_string(e.key) and is_string(e.value) for e in value.elements
    ):
        raise Unrecognised(f"`{code(found[1])}` is not a dict of names")
    return {e.key.evaluated_value: e.value.evaluated_value for e in value.elements}


def _missing(cls: cst.ClassDef) -> dict[str, str]:
    """standard name -> the class's alias, for the entries the class lacks."""
    init = method(cls, "__init__")
    assigned = set(self_assignments(init)) if init is not None else set()
    mapped = _mapped(cls)
    missing = {}
    for standard, aliases in ALIASES.items():
        alias = next((a for a in aliases if a in assigned), None)
        if alias and standard not in assigned and standard not in mapped:
            missing[standard] = alias
    return missing


def _configs(tree: cst.Module) -> list[cst.ClassDef]:
    def is_config(base: cst.Arg) -> bool:
        return (full_name(base.value) or "").split(".")[-1] in CONFIG_BASES

    return [s for s in tree.body if isinstance(s, cst.ClassDef) and any(is_config(b) for b in s.bases)]


def _marked(cls: cst.ClassDef) -> bool:
    found = _map_line(cls)
    return found is not None and any(
        line.comment and line.comment.value.startswith(f"{MARKER} {NAME}") for line in found[1].leading_lines
    )


def inspect(tree: cst.Module) -> State:
    configs = _configs(tree)
    if any(_missing(c) for c in configs):
        return State.NEEDED
    return State.DONE if any(_marked(c) for c in configs) else State.ABSENT


def _with_entries(cls: cst.ClassDef) -> cst.ClassDef:
    missing = _missing(cls)
    if not missing:
        return cls
    body = list(cls.body.body)
    entries = "".join(f'"{standard}": "{alias}", ' for standard, alias in missing.items())
    found = _map_line(cls)
    if found is None:
        at = docstring_offset(body)
        while at < len(body) and isinstance(body[at], cst.SimpleStatementLine):
            at += 1  # after the class attributes (model_type, keys_to_ignore_at_inference, ...)
        line = template(f"attribute_map = {{{entries.rstrip(', ')}}}\n")[0]
        body.insert(at, with_marker(line, NAME, WHY))
    else:
        at, line = found
        old = line.body[0].value
        added = template(f"x = {{{entries.rstrip(', ')}}}\n")[0].body[0].value.elements
        elements = list(old.elements)
        if elements:
            elements[-1] = elements[-1].with_changes(comma=cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")))
        value = old.with_changes(elements=[*elements, *added])
        body[at] = with_marker(line.with_changes(body=[line.body[0].with_changes(value=value)]), NAME, WHY)
    return with_block(cls, body)


def rewrite(tree: cst.Module) -> cst.Module:
    chosen = {id(c) for c in _configs(tree)}
    return tree.with_changes(body=[_with_entries(s) if id(s) in chosen else s for s in tree.body])


PATCH = Patch(
    name=NAME,
    order=36,
    description="map the standard config names transformers reads to a configuration class's own (attribute_map)",
    default=True,
    inspect=inspect,
    rewrite=rewrite,
)
