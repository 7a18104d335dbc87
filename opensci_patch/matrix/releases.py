"""Which transformers releases the matrix runs, resolved at run time from the package index.

The pinned list (`matrix.TRANSFORMERS_VERSIONS`) only knows the releases someone typed in; users pin
whatever their stack has, including the release that came out last night. So:

- `resolve()` is the pinned list plus the newest final release on the index (the default matrix: a
  release that came out last night is in it with no edit); `resolve(newest=False)` the pinned list only;
- `resolve(sweep=True)` adds the latest patch release of every minor from the oldest supported
  minor (4.48) to the newest final release on the index;
- `resolve(pre=True)` adds the newest pre-release when it is newer than the newest final;
- `newest_final()` is what "newest" means in the workflows: the index's, not our list's.

The index is read through the simple repository API (PEP 691 JSON, falling back to PEP 503 HTML),
from `OPENSCI_PATCH_INDEX_URL`, else `PIP_INDEX_URL`, `UV_DEFAULT_INDEX`, `UV_INDEX_URL`, else PyPI.
Where it cannot be reached the pinned list is used and a note says so on stderr: a run without
network still runs, and nobody mistakes it for a sweep.

Standard library plus `packaging` (which nox itself depends on): the noxfile and the workflow's
plan job import this without torch or transformers.
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable

from packaging.version import InvalidVersion, Version

from opensci_patch._util import defaults
from opensci_patch._util.errors import OpensciPatchError

PYPI_SIMPLE = "https://pypi.org/simple"
INDEX_VARIABLES = ("OPENSCI_PATCH_INDEX_URL", "PIP_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX_URL")
OLDEST_SUPPORTED = Version(defaults.OLDEST_SUPPORTED)
PROJECT = "transformers"


def _file_pattern(project: str) -> re.Pattern[str]:
    """The file names of a project page: transformers-5.24.0-py3-none-any.whl, transformers-5.24.0.tar.gz."""
    name = "[-_.]+".join(map(re.escape, re.split(r"[-_.]+", project)))  # PEP 503: huggingface-hub ~ huggingface_hub
    return re.compile(rf"^{name}-([^-]+?)(?:-[^-]+-[^-]+-[^-]+\.whl|\.tar\.gz|\.zip)$", re.IGNORECASE)


class IndexUnreachable(OpensciPatchError):
    """The package index could not be read; callers fall back to the pinned list."""


def index_url() -> str:
    for name in INDEX_VARIABLES:
        if value := os.environ.get(name, "").strip():
            return value.rstrip("/")
    return PYPI_SIMPLE


class _Anchors(html.parser.HTMLParser):
    """(file name, yanked) for every <a> of a PEP 503 project page."""

    def __init__(self) -> None:
        super().__init__()
        self.files: list[tuple[str, bool]] = []
        self._yanked: bool | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._yanked = any(name == "data-yanked" for name, _ in attrs)

    def handle_data(self, data: str) -> None:
        if self._yanked is not None and data.strip():
            self.files.append((data.strip(), self._yanked))

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self._yanked = None


def _project_files(url: str, timeout: float, project: str = PROJECT) -> list[tuple[str, bool]]:
    request = urllib.request.Request(
        f"{url}/{project}/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            kind = resp.headers.get("Content-Type", "")
            body = resp.read().decode("utf-8", errors="replace")
    except (OSError, ValueError) as exc:  # URLError, timeouts, HTTP errors, a malformed URL
        raise IndexUnreachable(f"cannot read {url}/{project}/ ({exc})") from None
    if "json" in kind:
        try:
            files = json.loads(body)["files"]
            return [(f["filename"], bool(f.get("yanked"))) for f in files]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise IndexUnreachable(f"{url}/{project}/ is not a simple-API page ({exc})") from None
    parser = _Anchors()
    parser.feed(body)
    return parser.files


def index_versions(timeout: float = 20, project: str = PROJECT) -> list[Version]:
    """Every release of `project` (transformers unless named) on the index that has a non-yanked file, oldest first."""
    url = index_url()
    found: set[Version] = set()
    pattern = _file_pattern(project)
    for name, yanked in _project_files(url, timeout, project):
        m = pattern.match(name)
        if m is None or yanked:
            continue
        try:
            found.add(Version(m[1]))
        except InvalidVersion:
            continue
    if not found:
        raise IndexUnreachable(f"{url}/{project}/ lists no {project} release")
    return sorted(found)


def latest_patches(versions: Iterable[Version], oldest: Version = OLDEST_SUPPORTED) -> list[Version]:
    """The latest final patch release of every minor from `oldest`'s minor on."""
    by_minor: dict[tuple[int, int], Version] = {}
    for v in versions:
        if v.is_prerelease or v.is_devrelease or v.release[:2] < oldest.release[:2]:
            continue
        key = (v.major, v.minor)
        by_minor[key] = max(by_minor.get(key, v), v)
    return [by_minor[k] for k in sorted(by_minor)]


def newest_pre(versions: Iterable[Version]) -> Version | None:
    """The newest pre-release when it is newer than the newest final release, else None."""
    versions = list(versions)
    finals = [v for v in versions if not (v.is_prerelease or v.is_devrelease)]
    pres = [v for v in versions if v.is_prerelease or v.is_devrelease]
    if not pres:
        return None
    candidate = max(pres)
    return candidate if not finals or candidate > max(finals) else None


def _sorted(versions: Iterable[str]) -> list[str]:
    return sorted(set(versions), key=Version)


def _warn(message: str) -> None:
    print(f"opensci-patch: note: {message}", file=sys.stderr)


def resolve(
    pinned: Iterable[str],
    *,
    sweep: bool = False,
    pre: bool = False,
    newest: bool = True,
    fetch: Callable[[], list[Version]] = index_versions,
    warn: Callable[[str], None] = _warn,
) -> list[str]:
    """The releases to run, oldest first: `pinned`, the newest final on the index (unless `newest=False`),
    and the sweep and the newest pre-release when asked."""
    pinned = _sorted(pinned)
    if not (sweep or pre or newest):
        return pinned
    try:
        available = fetch()
    except IndexUnreachable as exc:
        what = "not the sweep" if sweep else "without the newest release on the index"
        warn(f"{exc}; running the pinned list only ({len(pinned)} releases), {what}")
        return pinned
    out = set(pinned)
    finals = [v for v in available if not (v.is_prerelease or v.is_devrelease) and v >= OLDEST_SUPPORTED]
    if newest and finals:
        out.add(str(max(finals)))
    if sweep:
        out |= {str(v) for v in latest_patches(available)}
    if pre and (candidate := newest_pre(available)) is not None:
        out.add(str(candidate))
    return _sorted(out)


def newest_final(
    pinned: Iterable[str],
    *,
    fetch: Callable[[], list[Version]] = index_versions,
    warn: Callable[[str], None] = _warn,
) -> str:
    """The newest final release on the index; the newest pinned one (with a note) when it is unreachable."""
    pinned = _sorted(pinned)
    try:
        finals = [v for v in fetch() if not (v.is_prerelease or v.is_devrelease)]
    except IndexUnreachable as exc:
        warn(f"{exc}; 'newest' is the newest pinned release, {pinned[-1]}")
        return pinned[-1]
    return str(max(finals)) if finals else pinned[-1]


# --- one canonical form of a release number given by a user, and whether that release exists ------------------


def _padded(v: Version) -> str:
    """`v` with its release padded to three parts (4.48 -> 4.48.0: what pip installs for ==4.48)."""
    head = ".".join(map(str, v.release))
    parts = list(v.release) + [0] * (3 - len(v.release))
    return ".".join(map(str, parts)) + str(v)[len(head) :]


def canonical(text: str, *, what: str = "--transformers", pre: bool = False) -> str:
    """The one canonical form of a transformers release a user named (`cell`, `bisect`, `diagnose`, the
    noxfile's OPENSCI_PATCH_RELEASES, env names), or `OpensciPatchError` (exit 2) saying why not.

    Surrounding whitespace is dropped, the release is padded to three parts (`4.48` -> `4.48.0`, so one
    release is one env and one report row), `packaging` normalises the rest (`5.2.0RC1` -> `5.2.0rc1`).
    Refused: what is not a version, local or epoch versions, pre- and dev releases unless `pre`, and
    releases older than the oldest supported one.
    """
    stripped = str(text).strip()
    try:
        v = Version(stripped)
    except InvalidVersion:
        raise OpensciPatchError(f"{what} {text!r} is not a transformers release number (e.g. 5.2.0)") from None
    if v.local is not None or v.epoch:
        raise OpensciPatchError(f"{what} {text!r} is not a release on the package index (local or epoch version)")
    if (v.is_prerelease or v.is_devrelease) and not pre:
        raise OpensciPatchError(f"{what} {stripped} is a pre-release; pass --pre to run pre-releases")
    if v < OLDEST_SUPPORTED:
        raise OpensciPatchError(
            f"{what} {stripped}: transformers {stripped} is unsupported (< {OLDEST_SUPPORTED}); choose a newer one"
        )
    return _padded(v)


def _built(version: str, root) -> bool:
    """A per-release env of this release was built here before (its marker is there)."""
    from glob import escape

    from opensci_patch._util.locations import MARKER, default_root

    base = root or default_root()
    return any((p / MARKER).is_file() for p in base.expanduser().glob(f"tf{escape(version)}-*"))


def _wheel_releases(directory: str) -> set[str]:
    from pathlib import Path

    found, pattern = set(), _file_pattern(PROJECT)
    for p in Path(directory).expanduser().glob(f"{PROJECT}-*"):
        m = pattern.match(p.name)
        try:
            if m:
                found.add(_padded(Version(m[1])))
        except InvalidVersion:
            continue
    return found


def check_known(
    versions: Iterable[str],
    pinned: Iterable[str],
    *,
    root=None,
    fetch: Callable[[], list[Version]] | None = None,
) -> None:
    """Refuse (exit 2, before any work) a release that does not exist: known are the pinned releases and those
    with a built env; any other must be on the package index, or with OPENSCI_PATCH_WHEELS in that directory.
    Offline, a release that is not known is refused too (it could not be installed)."""
    from opensci_patch._util.locations import WHEELS_VAR

    unknown = [v for v in dict.fromkeys(versions) if v not in set(pinned) and not _built(v, root)]
    if not unknown:
        return
    if wheels := os.environ.get(WHEELS_VAR):
        where, available = f"{WHEELS_VAR}={wheels}", _wheel_releases(wheels)
    else:
        try:
            where, available = index_url(), {_padded(v) for v in (fetch or index_versions)()}
        except IndexUnreachable as exc:
            raise OpensciPatchError(
                f"transformers {unknown[0]} is neither pinned nor built here, and {exc} to check that it exists"
            ) from None
    missing = [v for v in unknown if v not in available]
    if missing:
        raise OpensciPatchError(f"transformers {', '.join(missing)}: no such release in {where}")
