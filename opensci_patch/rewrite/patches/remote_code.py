"""remote_code: the model classes say they are remote code, also when their config is a library class.

transformers 5.3.0 (that release only) protects loaded tensors from a `_init_weights` that writes
through `.data` (`module.weight.data.normal_()`, which the per-tensor `_is_hf_initialized` guard of
`transformers.initialization` cannot see) only for remote code: `_initialize_weights` skips a module
whose tensors were all loaded when `is_remote_code()`, i.e. `cls._auto_class is not None`. But
`AutoModel*.from_pretrained(trust_remote_code=True)` sets `_auto_class` (`register_for_auto_class`)
only when the config class is *not* in the library's mapping: a remote file built on the library's
`LlamaConfig` or `Qwen3Config` (`model_type: llama`) is loaded from the checkpoint's code but counted as
library code, so 5.3.0 re-runs its `.data.normal_()` over every loaded weight (every tensor differs
from the checkpoint; 5.2.0 skipped loaded modules for every model, 5.4+ ask `is_custom_code()`, true for
any class outside `transformers.`). A vendored copy that imports the library's config through a module of
its checkpoint (`from .configuration_llama import LlamaConfig`, which re-exports the library's class) is
the same case. A file with its own config class (the shipped, the generated) is registered, so 5.3+
already count it as remote code; the method changes nothing for it.

Detects: in a file importing a config class (other than the `PretrainedConfig` base) from transformers
(`from transformers... import XConfig`) or from a module of its checkpoint (`from .x import XConfig`),
the classes deriving from a base named `PreTrainedModel` directly (the file's base model class).
Rewrites: adds a classmethod `is_remote_code` returning True to each: the class is loaded from a
checkpoint's code. transformers before 5.3 never calls it; 5.3+ use it for the init skip above, for
the missing tied keys (`mark_tied_weights_as_initialized`, see `tied_weights`), for not asking the hub's
safetensors converter (offline here) and for saving the code next to the weights in `save_pretrained`.
Verifies: each such class defines `is_remote_code` as written here (another definition is refused).
"""

from __future__ import annotations

import libcst as cst

from opensci_patch.rewrite.patches.base import Patch, State, Unrecognised
from opensci_patch.rewrite.patches.inserts import append_method, template_members, template_shape
from opensci_patch.rewrite.patches.syntax import full_name, method, method_shape, pretrained_roots
from opensci_patch.rewrite.patches.tree_walk import find_all

NAME = "remote_code"
BASE_CONFIGS = ("PretrainedConfig", "PreTrainedConfig", "GenerationConfig")
WHY = "transformers 5.3.0 re-initialises loaded weights of remote code it counts as library code"
METHOD = '''
class _Template:
    @classmethod
    def is_remote_code(cls):
        """Loaded from a checkpoint's code, also when its config class is the library's."""
        return True
'''


def _configs(node: cst.ImportFrom) -> list[str]:
    """The config classes (not the bases) one `from ... import` names."""
    if isinstance(node.names, cst.ImportStar):
        return []
    return [n for a in node.names if (n := full_name(a.name) or "").endswith("Config") and n not in BASE_CONFIGS]


def library_configs(tree: cst.Module) -> list[str]:
    """The config classes this file imports from transformers (`LlamaConfig`, `Qwen3Config`, ...)."""
    names = []
    for node in find_all(tree, cst.ImportFrom):
        module = full_name(node.module) if node.module is not None and not node.relative else None
        if module and module.split(".")[0] == "transformers":
            names += _configs(node)
    return names


def sibling_configs(tree: cst.Module) -> list[str]:
    """The config classes this file imports from a module of its checkpoint (`from .configuration_x import XConfig`)."""
    return [n for node in find_all(tree, cst.ImportFrom) if node.relative for n in _configs(node)]


def _assigned(cls: cst.ClassDef) -> list[cst.BaseExpression]:
    """The targets of the class body's plain and annotated assignments."""
    out: list[cst.BaseExpression] = []
    for stmt in cls.body.body:
        for small in stmt.body if isinstance(stmt, cst.SimpleStatementLine) else ():
            if isinstance(small, cst.Assign):
                out += [t.target for t in small.targets]
            elif isinstance(small, cst.AnnAssign):
                out.append(small.target)
    return out


def inspect(tree: cst.Module) -> State:
    roots = pretrained_roots(tree)
    if not roots or not (library_configs(tree) or sibling_configs(tree)):
        return State.ABSENT
    done = True
    for cls in roots:
        if any(full_name(t) == "is_remote_code" for t in _assigned(cls)):
            raise Unrecognised(f"{cls.name.value} assigns is_remote_code; define it as a classmethod returning True")
        own = method(cls, "is_remote_code")
        if own is None:
            done = False
        elif method_shape(own) != template_shape(METHOD):
            raise Unrecognised(f"{cls.name.value} defines its own is_remote_code; make it return True")
    return State.DONE if done else State.NEEDED


def rewrite(tree: cst.Module) -> cst.Module:
    missing = [cls for cls in pretrained_roots(tree) if method(cls, "is_remote_code") is None]
    return append_method(tree, missing, template_members(METHOD)[0], NAME, WHY)


PATCH = Patch(
    name=NAME,
    order=62,
    description="the model classes report is_remote_code() (5.3.0 otherwise re-initialises loaded weights "
    "of remote code built on a library config)",
    default=True,
    inspect=inspect,
    rewrite=rewrite,
)
