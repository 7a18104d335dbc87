"""Dependency overrides for releases whose pins the package index cannot meet.

transformers 5.25.0 requires `kernels>=0.19.1,<0.20`; an index that has only kernels 0.17.2 cannot install it,
so the release cannot be tested at all. An overrides file declares, per range of transformers releases, the
requirements that replace the release's own (uv's `--override`: the declared requirement wins over every
dependency's pin of that package). One line each; as in pip's requirements files a `#` at the start of a line or
after whitespace starts a comment, so a URL's `#sha256=...` fragment stays part of its requirement::

    transformers>=5.25,<5.26: kernels>=0.17
    transformers==5.25.0: kernels; sys_platform == "never"    # leave kernels out altogether

The part before the first `:` is a PEP 440 specifier set on the transformers release (the word `transformers`
is optional); the rest is one PEP 508 requirement. A requirement with a marker that is never true leaves the
package out (uv's documented way to drop a dependency). Nothing is silent: the env's marker keeps the overrides
it was built with (an env is reused only for the same overrides, and its directory name carries their digest),
`capture` records them in the record's `environment["overrides"]`, and the report shows them next to the cell.

Added requirements (`cell --require PKG`, repeatable; `OPENSCI_PATCH_REQUIRE`, one per line): packages a model
file imports that transformers does not depend on (`einops`, `accelerate`), installed into every release env
the run builds. Like overrides, they are in the env's name (`-rq<digest>`) and marker, in the record's
`environment["extra_requirements"]`, and shown in the report next to the cell (as `+einops`).

Where to pass it: `opensci-patch cell --overrides FILE`, or `OPENSCI_PATCH_OVERRIDES=FILE` for every command
that builds envs (cell, diagnose, bisect, the cross-version tests). `nox -s matrix`, the cell sessions and the
nightly use the committed `matrix-overrides.txt`.

pip (no uv): pip has no `--override`; the env installs transformers with `--no-deps`, then its own
requirements as its metadata lists them (without extras) with each overridden package's requirement replaced
by the override, in one resolver run (envs.py).

Standard library plus `packaging`: the noxfile imports this without torch.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from opensci_patch._util.errors import OpensciPatchError

VAR = "OPENSCI_PATCH_OVERRIDES"
REQUIRE_VAR = "OPENSCI_PATCH_REQUIRE"
COMMITTED = Path(__file__).resolve().parents[2] / "matrix-overrides.txt"


class OverridesError(OpensciPatchError):
    """The overrides file cannot be read or has a line that is not `RANGE: REQUIREMENT`."""


@dataclass(frozen=True)
class Override:
    releases: SpecifierSet
    requirement: str  # as written (normalised by packaging)

    def applies(self, version: str) -> bool:
        return self.releases.contains(Version(version), prereleases=True)


MAX_BYTES = 1 << 20  # an overrides file is a few lines; more is not one
_COMMENT = re.compile(r"(^|\s+)#.*$")  # pip's rule: `#` at the start or after whitespace, never inside a URL


def parse(text: str, source: str = "<overrides>") -> list[Override]:
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = _COMMENT.sub("", raw).strip()
        if not line:
            continue
        where = f"{source}, line {number}"
        if ":" not in line:
            example = "`>=5.25,<5.26: kernels>=0.17`"
            raise OverridesError(f"{where}: {raw.strip()!r} is not `RANGE: REQUIREMENT` (e.g. {example})")
        spec, req = (part.strip() for part in line.split(":", 1))
        spec = spec.removeprefix("transformers").strip()
        try:
            releases = SpecifierSet(spec)
        except InvalidSpecifier:
            raise OverridesError(f"{where}: {spec!r} is not a release range such as >=5.25,<5.26") from None
        if not str(releases):
            raise OverridesError(f"{where}: no release range before the ':' (an override for every release is refused)")
        try:
            parsed = Requirement(req)
        except InvalidRequirement as exc:
            raise OverridesError(f"{where}: {req!r} is not a requirement ({exc})") from None
        if parsed.name.lower() in ("transformers", "torch"):
            raise OverridesError(f"{where}: {parsed.name} cannot be overridden (the matrix pins it)")
        out.append(Override(releases, str(parsed)))
    return out


def load(path: Path | str | None) -> list[Override]:
    """The overrides of a file; none for None."""
    if path is None:
        return []
    path = Path(path)
    try:  # non-blocking: a FIFO must not hang the run; fstat then refuses it, a device and a directory
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                what = "a pipe, device or directory"
                raise OverridesError(f"{path}: not a regular file ({what}); name an overrides file")
            data = fh.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise OverridesError(f"{path}: larger than {MAX_BYTES} bytes; an overrides file is a few lines")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise OverridesError(f"{path}: cannot read the overrides file ({why})") from None
    return parse(text, str(path))


def from_env() -> list[Override]:
    """The overrides named by `OPENSCI_PATCH_OVERRIDES` (none when it is unset or empty)."""
    return load(os.environ.get(VAR) or None)


def for_release(overrides: list[Override], version: str) -> list[str]:
    """The requirements that apply to this transformers release, in file order, each once."""
    return list(dict.fromkeys(o.requirement for o in overrides if o.applies(version)))


def digest(requirements: list[str]) -> str:
    return hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:8]


def requirements(values: list[str], source: str = "--require") -> list[str]:
    """Added requirements, each a PEP 508 requirement (normalised, each once); transformers and torch refused."""
    out = []
    for value in values:
        try:
            parsed = Requirement(value.strip())
        except InvalidRequirement as exc:
            raise OverridesError(f"{source} {value!r} is not a requirement ({exc})") from None
        if parsed.name.lower() in ("transformers", "torch"):
            raise OverridesError(f"{source} {value!r}: {parsed.name} cannot be added (the matrix pins it)")
        out.append(str(parsed))
    return list(dict.fromkeys(out))


def requirements_from_env() -> list[str]:
    """The added requirements named by `OPENSCI_PATCH_REQUIRE` (one per line; none when unset or empty)."""
    lines = [line for line in (os.environ.get(REQUIRE_VAR) or "").splitlines() if line.strip()]
    return requirements(lines, REQUIRE_VAR)
