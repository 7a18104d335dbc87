"""hub_kernels: transformers 5.25 turns hub kernels on by default; the model keeps them off unless asked.

5.24's `from_pretrained` popped `use_kernels` with default False. 5.25.0 pops it with default None and
turns None into True unless the environment variable `USE_HUB_KERNELS` is false, then calls
`set_use_kernels(True)`, which raises `ValueError: Kernels are not available` when the `kernels`
package is missing or outside 0.19.1..0.20 (this project's package index has 0.17.2 at most), and,
where a compatible `kernels` is installed, kernelizes every layer decorated
`@use_kernel_forward_from_hub(...)` (the generated file's RMSNorm) with code fetched from the Hub:
other numerics, a network access on an offline machine, code the caller never asked for
(docs/upstream.md, "5.25.0").

Rewrites: the class that subclasses `PreTrainedModel` directly (every model class of the file inherits
from it) gets a `from_pretrained` classmethod that passes `use_kernels=False` when the caller gave
neither `use_kernels` nor `kernel_config` (5.24 read a `kernel_config` as a request for kernels; so
does this) and the installed `from_pretrained` reads the keyword (a string constant of its code: 4.53+).
Releases before 4.53 hand unknown keywords on to the config and the model's `__init__`, so there it
passes nothing. `use_kernels=True` goes through unchanged, and upstream's requirement on `kernels`
applies. On 4.53 .. 5.24 False is already the default: a no-op. The
`@use_kernel_forward_from_hub` decorators stay: they only mark a layer as replaceable, and nothing
replaces it unless kernels are turned on.

Detects: classes whose bases name `PreTrainedModel`. Refuses such a class that defines its own
`from_pretrained` (it may load in a way this override does not know).
Verifies: each such class defines exactly the method below.
"""

from __future__ import annotations

import libcst as cst

from opensci_patch.rewrite.patches.base import Patch, State, Unrecognised, combined
from opensci_patch.rewrite.patches.inserts import append_method, template_members, template_shape
from opensci_patch.rewrite.patches.syntax import method, method_shape, pretrained_roots

NAME = "hub_kernels"
WHY = "transformers 5.25 turns hub kernels on by default"
METHOD = '''
class _Template:
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`use_kernels=False` unless the caller asks for hub kernels (transformers 5.25 defaults to True).

        Passed only where the installed `from_pretrained` reads the keyword (4.53+): older releases hand
        unknown keywords on to the model. A caller's `use_kernels` or `kernel_config` goes through as given.
        """
        upstream = super().from_pretrained
        func = getattr(upstream, "__func__", upstream)
        while hasattr(func, "__wrapped__"):
            func = func.__wrapped__
        reads = "use_kernels" in getattr(getattr(func, "__code__", None), "co_consts", ())
        if reads and "use_kernels" not in kwargs and "kernel_config" not in kwargs:
            kwargs["use_kernels"] = False
        return upstream(*args, **kwargs)
'''


def _state(cls: cst.ClassDef) -> State:
    own = method(cls, "from_pretrained")
    if own is None:
        return State.NEEDED
    if method_shape(own) != template_shape(METHOD):
        raise Unrecognised(
            f"{cls.name.value} defines its own from_pretrained; make it pass use_kernels=False where the "
            "caller did not ask for hub kernels (transformers 5.25 turns them on by default)"
        )
    return State.DONE


def inspect(tree: cst.Module) -> State:
    return combined(_state(cls) for cls in pretrained_roots(tree))


def rewrite(tree: cst.Module) -> cst.Module:
    needed = [cls for cls in pretrained_roots(tree) if _state(cls) is State.NEEDED]
    return append_method(tree, needed, template_members(METHOD)[0], NAME, WHY)


PATCH = Patch(
    name=NAME,
    order=65,
    description="keep hub kernels off unless the caller asks for them (transformers 5.25 turns them on by default)",
    default=True,
    inspect=inspect,
    rewrite=rewrite,
)
