"""The patch registry: source rewrites that make open-sci-ref remote code work on released transformers.

`PATCHES` is every module here that defines `PATCH`, sorted by `Patch.order`: they are applied in that
order, and later ones may rely on earlier ones
(`inv_freq_guard` recomputes frequencies through `rope_init_fn`, which `rope_default` makes
resolvable on 5.x). Default patches make the file load and give the 4.48 logits on every release
from 4.48.0 to 5.25.0; opt-in ones (`default=False`) fix what the test matrix must still show as
an upstream regression unless asked for.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable

from opensci_patch._util.errors import PatchError
from opensci_patch.rewrite.patches.base import Outcome, Patch, PatchStatus, State, apply_all

__all__ = [
    "PATCHES", "Outcome", "Patch", "PatchStatus", "State", "apply_patches", "by_name", "default_patches", "select",
]  # fmt: skip


def _discover() -> tuple[Patch, ...]:
    """Every module of this package that defines `PATCH`, in `Patch.order`: adding a patch is one new module."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if isinstance(getattr(module, "PATCH", None), Patch):
            found.append(module.PATCH)
    orders = [p.order for p in found]
    if len(set(orders)) != len(orders):
        raise RuntimeError(f"two patches share an order: {sorted((p.order, p.name) for p in found)}")
    return tuple(sorted(found, key=lambda p: p.order))


PATCHES: tuple[Patch, ...] = _discover()


def by_name(name: str) -> Patch:
    for patch in PATCHES:
        if patch.name == name:
            return patch
    known = ", ".join(p.name for p in PATCHES)
    raise PatchError(f"unknown patch {name!r}; known patches: {known}")


def default_patches() -> list[Patch]:
    return [p for p in PATCHES if p.default]


def select(extras: Iterable[str] = (), only: Iterable[str] | None = None) -> list[Patch]:
    """The default patches plus the named extras, in registry order; or exactly `only`.

    `only` exists for experiments such as "what do the structural fixes alone do on 5.x?".
    """
    if only is not None:
        chosen = {by_name(name).name for name in only}
        return [p for p in PATCHES if p.name in chosen]
    wanted = {by_name(name).name for name in extras}
    return [p for p in PATCHES if p.default or p.name in wanted]


def apply_patches(
    source: str, patches: Iterable[Patch], filename: str = "<source>", refused: dict[str, list[str]] | None = None
) -> tuple[str, dict[str, PatchStatus]]:
    """Apply `patches` in order to one file's source; returns the new source and each patch's status
    (`refused`, when given, gets what each patch left as it was and why: `base.apply_all`)."""
    return apply_all(list(patches), source, filename, refused)
