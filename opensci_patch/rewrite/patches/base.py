"""The contract every source patch follows, and `apply_all`, which runs the patches on one file.

A patch is data (`name`, `description`, `default`) and two functions over a libcst tree:
`inspect` says whether the construct is absent, already fixed or still needs fixing, and
`rewrite` fixes it. `Patch.apply` runs inspect -> rewrite -> inspect again on the re-parsed
output, so the post-condition is checked by the same code that detects the problem: a rewrite
that does not verify is an error, never a silent no-op. Both functions raise `Unrecognised`
when the construct is there in a shape they do not know; `apply` turns that into a
`PatchError` naming the patch and the file, because guessing on a user's model is worse than
stopping.

`apply_all` (what `hotfix` runs per file) gives the result of `Patch.apply` one patch after another
from one parse of the file and one re-parse of its output, with `tree_walk.indexed()` on (each subtree
walked once however many patches ask) and the cyclic garbage collector paused: libcst allocates an
object per token and the patches free almost none of them, so its collections found nothing to free
(about 5% of a hotfix's instructions, more in a long-lived process with a larger heap).
`benchmarks/hotfix_wall.py` measures it. The patches' shared helpers are in `syntax` (reading a
tree), `inserts` (writing into one) and `tree_walk` (finding nodes in one).
"""

from __future__ import annotations

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

Status = Literal["applied", "already-applied", "not-applicable"]


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


@dataclass(frozen=True)
class Outcome:
    """Result of applying one patch to one file's source text."""

    status: Status
    source: str

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
        try:
            state = self.inspect(tree)
            if state is State.ABSENT:
                return Outcome("not-applicable", source)
            if state is State.DONE:
                return Outcome("already-applied", source)
            new_source = self.rewrite(tree).code
            after = self.inspect(self._parse(new_source, filename, "produced unparsable code for"))
        except Unrecognised as exc:
            raise PatchError(
                f"patch {self.name!r} cannot rewrite {filename}: {exc}; "
                "the file differs from what the patch knows, fix it by hand or report it"
            ) from exc
        if after is not State.DONE:
            raise PatchError(
                f"patch {self.name!r} did not verify on {filename}: after rewriting, inspection says "
                f"{after.value!r} instead of 'done'; please report this"
            )
        return Outcome("applied", new_source)

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


def apply_all(patches: Sequence[Patch], source: str, filename: str = "<source>") -> tuple[str, dict[str, Status]]:
    """Apply `patches` in order to one file's source; returns the new source and each patch's status.

    The result `Patch.apply` gives one patch after another (each parsing its predecessor's output and
    re-parsing its own), in one parse: every patch inspects and rewrites the tree the one before it
    left, and one re-parse of the final source verifies it (each patch's `inspect` says done or absent).
    Whenever that path fails or does not verify, the patches run again one by one, so errors and
    statuses are exactly theirs (a `PatchError` naming the patch and the file).
    """
    if not patches:
        return source, {}
    with indexed(), _collection_paused():
        try:
            result = _on_one_tree(patches, source)
        except Exception:  # an unparsable file, an Unrecognised construct...: the one-by-one path says which
            result = None
        if result is not None:
            return result
        statuses: dict[str, Status] = {}
        for patch in patches:
            outcome = patch.apply(source, filename)
            statuses[patch.name] = outcome.status
            source = outcome.source
        return source, statuses


def _on_one_tree(patches: Sequence[Patch], source: str) -> tuple[str, dict[str, Status]] | None:
    tree = cst.parse_module(source)
    statuses: dict[str, Status] = {}
    for patch in patches:
        state = patch.inspect(tree)
        if state is State.NEEDED:
            tree = patch.rewrite(tree)
        statuses[patch.name] = {State.ABSENT: "not-applicable", State.DONE: "already-applied"}.get(state, "applied")
    if "applied" not in statuses.values():
        return source, statuses
    new_source = tree.code
    final = cst.parse_module(new_source)
    if any(patch.inspect(final) not in (State.DONE, State.ABSENT) for patch in patches):
        return None
    return new_source, statuses


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
