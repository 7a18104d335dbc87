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

from . import defaults
from .errors import OpensciPatchError

PYPI_SIMPLE = "https://pypi.org/simple"
INDEX_VARIABLES = ("OPENSCI_PATCH_INDEX_URL", "PIP_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX_URL")
OLDEST_SUPPORTED = Version(defaults.OLDEST_SUPPORTED)
PROJECT = "transformers"
# the file names of a project page: transformers-5.24.0-py3-none-any.whl, transformers-5.24.0.tar.gz
_FILE = re.compile(rf"^{PROJECT}-([^-]+?)(?:-[^-]+-[^-]+-[^-]+\.whl|\.tar\.gz|\.zip)$", re.IGNORECASE)


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


def _project_files(url: str, timeout: float) -> list[tuple[str, bool]]:
    request = urllib.request.Request(
        f"{url}/{PROJECT}/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            kind = resp.headers.get("Content-Type", "")
            body = resp.read().decode("utf-8", errors="replace")
    except (OSError, ValueError) as exc:  # URLError, timeouts, HTTP errors, a malformed URL
        raise IndexUnreachable(f"cannot read {url}/{PROJECT}/ ({exc})") from None
    if "json" in kind:
        try:
            files = json.loads(body)["files"]
            return [(f["filename"], bool(f.get("yanked"))) for f in files]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise IndexUnreachable(f"{url}/{PROJECT}/ is not a simple-API page ({exc})") from None
    parser = _Anchors()
    parser.feed(body)
    return parser.files


def index_versions(timeout: float = 20) -> list[Version]:
    """Every release of transformers on the index that has a non-yanked file, oldest first."""
    url = index_url()
    found: set[Version] = set()
    for name, yanked in _project_files(url, timeout):
        m = _FILE.match(name)
        if m is None or yanked:
            continue
        try:
            found.add(Version(m[1]))
        except InvalidVersion:
            continue
    if not found:
        raise IndexUnreachable(f"{url}/{PROJECT}/ lists no {PROJECT} release")
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
