"""The contract every source patch follows, and `apply_all`, which runs the patches on one file.

A patch is data (`name`, `description`, `default`) and two functions over a libcst tree:
`inspect` says whether the construct is absent, already fixed or still needs fixing, and
`rewrite` fixes it. `Patch.apply` runs inspect -> rewrite -> inspect again on the re-parsed
output, so the post-condition is checked by the same code that detects the problem: a rewrite
that does not verify is an error, never a silent no-op. Both functions raise `Unrecognised`
when the construct is there in a shape they do not know; `apply` turns that into a
`PatchError` naming the patch and the file, because guessing on a user's model is worse than
stopping. A patch that finds several such constructs (classes) and does not know one of them may instead
`refuse(why)` that one and go on with the others: `Patch.apply` lists it in `Outcome.refused`, and the status
is "refused" when nothing else was found.

`apply_all` runs the other patches after a refused one: a patch that raises `Unrecognised` on a file is
"refused" there (its message kept in `refused`), the file as it was for that patch; so one construct a patch
does not know no longer stops the patches whose preconditions hold. `hotfix` lists every refusal in its
output, the manifest and its exit status.

`apply_all` (what `hotfix` runs per file) gives the result of `Patch.apply` one patch after another
from one parse of the file and one re-parse of its output, with `tree_walk.indexed()` on (each subtree
walked once however many patches ask) and the cyclic garbage collector paused: libcst allocates an
object per token and the patches free almost none of them, so its collections found nothing to free
(about 5% of a hotfix's instructions, more in a long-lived process with a larger heap).
`benchmarks/hotfix_wall.py` measures it. The patches' shared helpers are in `syntax` (reading a
tree), `inserts` (writing into one) and `tree_walk` (finding nodes in one).

Patches find nodes through `tree_walk.find_all` / `tree_walk.walk` (and rewrite through
`tree_walk.visit_statements`), never with libcst's own traversal (`node.visit(visitor)`, `matchers.findall`):
libcst rebuilds every node it passes, even for a read-only visitor, and each patch asks several questions of
the same tree. Measured with the default patches on three files (the shipped and the generated open-sci file,
transformers 4.48's Llama file made remote code), `find_all` and `walk` swapped for `node.visit`: 167 s against
2.9 s, 57x slower (48x to 64x per file; best of 3, 2 busy CPUs; the same outputs). An earlier measurement
gave 8x; either way a new patch that walks the tree itself is the slow path. The code the patches insert is
in `opensci_patch/rewrite/templates/` (real Python files; see that package's docstring).
"""

from __future__ import annotations

import contextvars
import enum
import gc
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import libcst as cst

from opensci_patch._util.errors import PatchError
from opensci_patch.rewrite.patches.tree_walk import indexed

PatchStatus = Literal["applied", "already-applied", "not-applicable", "refused"]


class State(enum.Enum):
    """What `inspect` found in a file."""

    ABSENT = "absent"  # the construct is not in this file (e.g. a configuration file)
    DONE = "done"  # the post-condition holds: nothing to change
    NEEDED = "needed"  # the construct is there, in a shape the rewrite handles


def combined(states: Iterable[State]) -> State:
    """The state of a file from its constructs' (each checked, so a refused one raises even when another
    needs the rewrite): absent without any, needed while one is, else done."""
    found = list(states)
    if not found:
        return State.ABSENT
    return State.NEEDED if State.NEEDED in found else State.DONE


class Unrecognised(Exception):
    """The construct is present but not in a shape the patch can rewrite safely."""


_refusals: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("opensci_patch_refusals", default=None)


def refuse(why: str) -> None:
    """Leave one construct (e.g. one class of several) as it is and say why; the patch goes on with the others.

    Called from `inspect` (each time it runs: the reasons are kept once each). Outside `Patch.apply` and
    `apply_all` nothing collects it, so a patch must not rely on it to stop anything."""
    found = _refusals.get()
    if found is not None and why not in found:
        found.append(why)


@contextmanager
def _collecting() -> Iterator[list[str]]:
    found: list[str] = []
    token = _refusals.set(found)
    try:
        yield found
    finally:
        _refusals.reset(token)


@dataclass(frozen=True)
class Outcome:
    """Result of applying one patch to one file's source text."""

    status: PatchStatus
    source: str
    refused: tuple[str, ...] = ()  # the constructs left as they were, each with why (see `refuse`)

    @property
    def changed(self) -> bool:
        return self.status == "applied"


@dataclass(frozen=True)
class Patch:
    """One structure-aware source rewrite; see the module docstring for the contract."""

    name: str
    order: int  # place in the registry: patches apply in this order (later ones may rely on earlier ones)
    description: str
    default: bool
    inspect: Callable[[cst.Module], State]
    rewrite: Callable[[cst.Module], cst.Module]

    def apply(self, source: str, filename: str = "<source>") -> Outcome:
        """Rewrite `source` (one Python file); verify the result; idempotent on its own output."""
        tree = self._parse(source, filename, "cannot parse")
        with _collecting() as refused:
            try:
                state = self.inspect(tree)
                if state is not State.NEEDED:  # absent, but a construct refused: "refused", never "not applicable"
                    status = "refused" if state is State.ABSENT and refused else _STATUS[state]
                    return Outcome(status, source, tuple(refused))
                new_source = self.rewrite(tree).code
                after = self.inspect(self._parse(new_source, filename, "produced unparsable code for"))
            except Unrecognised as exc:
                raise self.refusal(filename, exc) from exc
        if after is not State.DONE:
            raise PatchError(
                f"patch {self.name!r} did not verify on {filename}: after rewriting, inspection says "
                f"{after.value!r} instead of 'done'; please report this"
            )
        return Outcome("applied", new_source, tuple(refused))

    def refusal(self, filename: str, exc: Unrecognised) -> PatchError:
        """The error for a construct this patch does not know (what `apply` raises, `apply_all` records)."""
        return PatchError(
            f"patch {self.name!r} cannot rewrite {filename}: {exc}; "
            "the file differs from what the patch knows, fix it by hand or report it"
        )

    def _parse(self, source: str, filename: str, what: str) -> cst.Module:
        try:
            return cst.parse_module(source)
        except cst.ParserSyntaxError as exc:
            where, message = f"line {exc.raw_line}, column {exc.raw_column + 1}", exc.message
            try:  # Python's own position where it has one (libcst puts an unterminated \"\"\" at line 1)
                compile(source, filename, "exec", dont_inherit=True)
            except SyntaxError as py:
                if py.lineno:
                    where, message = f"line {py.lineno}, column {py.offset or 1}", py.msg
            except (ValueError, OverflowError):
                pass
            raise PatchError(f"patch {self.name!r} {what} {filename}: syntax error at {where}: {message}") from exc


_STATUS: dict[State, PatchStatus] = {
    State.ABSENT: "not-applicable", State.DONE: "already-applied", State.NEEDED: "applied",
}  # fmt: skip


def apply_all(
    patches: Sequence[Patch],
    source: str,
    filename: str = "<source>",
    refused: dict[str, list[str]] | None = None,
) -> tuple[str, dict[str, PatchStatus]]:
    """Apply `patches` in order to one file's source; returns the new source and each patch's status.

    The result `Patch.apply` gives one patch after another (each parsing its predecessor's output and
    re-parsing its own), in one parse: every patch inspects and rewrites the tree the one before it
    left, and one re-parse of the final source verifies it (each patch's `inspect` says done or absent).
    Whenever that path fails or does not verify, the patches run again one by one, so errors and
    statuses are exactly theirs (a `PatchError` naming the patch and the file). A patch that does not
    know a construct is "refused" and the others go on; `refused` (when given) gets, per patch, what it
    left as it was and why. A file that cannot be parsed and a rewrite that does not verify still raise.
    """
    if not patches:
        return source, {}
    with indexed(), _collection_paused():
        try:
            result = _on_one_tree(patches, source, filename)
        except Exception:  # an unparsable file, a rewrite that fails...: the one-by-one path says which
            result = None
        if result is None:
            result = _one_by_one(patches, source, filename)
        new_source, statuses, why = result
        if refused is not None:
            refused.update({name: list(reasons) for name, reasons in why.items() if reasons})
        return new_source, statuses


_Result = tuple[str, dict[str, PatchStatus], dict[str, tuple[str, ...]]]


def _one_by_one(patches: Sequence[Patch], source: str, filename: str) -> _Result:
    statuses: dict[str, PatchStatus] = {}
    why: dict[str, tuple[str, ...]] = {}
    for patch in patches:
        try:
            outcome = patch.apply(source, filename)
        except PatchError as exc:
            if not isinstance(exc.__cause__, Unrecognised):
                raise
            outcome = Outcome("refused", source, (str(exc.__cause__),))
        statuses[patch.name], why[patch.name] = outcome.status, outcome.refused
        source = outcome.source
    return source, statuses, why


def _on_one_tree(patches: Sequence[Patch], source: str, filename: str) -> _Result | None:
    tree = cst.parse_module(source)
    statuses: dict[str, PatchStatus] = {}
    why: dict[str, tuple[str, ...]] = {}
    for patch in patches:
        with _collecting() as found:
            try:
                state = patch.inspect(tree)
                if state is State.NEEDED:
                    tree = patch.rewrite(tree)
            except Unrecognised as exc:
                state, found[:] = None, [str(exc)]
        refused = state is None or (state is State.ABSENT and found)
        statuses[patch.name], why[patch.name] = "refused" if refused else _STATUS[state], tuple(found)
    if "applied" not in statuses.values():
        return source, statuses, why
    new_source = tree.code
    final = cst.parse_module(new_source)
    if any(statuses[p.name] != "refused" and p.inspect(final) not in (State.DONE, State.ABSENT) for p in patches):
        return None
    return new_source, statuses, why


_paused = 0  # apply_all calls running now (threads): the collector is back on when the last one ends
_paused_lock = threading.Lock()
_was_enabled = True


@contextmanager
def _collection_paused() -> Iterator[None]:
    global _paused, _was_enabled
    with _paused_lock:
        if _paused == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _paused += 1
    try:
        yield
    finally:
        with _paused_lock:
            _paused -= 1
            if _paused == 0 and _was_enabled:
                gc.enable()
