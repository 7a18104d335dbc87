#!/usr/bin/env python3
"""Turn `nox --list --json` into the GitHub Actions job matrix of the cell sessions.

    nox --list --json -t cpu | python .github/scripts/nox_matrix.py                  # {"include": [...]}
    nox --list --json -t cpu | python .github/scripts/nox_matrix.py --transformers "5.2.0 newest"
    nox --list --json -t cpu | python .github/scripts/nox_matrix.py --format sessions  # one name a line

The noxfile (over `opensci_patch/matrix/spec.py`) is the only list of cells, as in gt4py's
`scripts/github_ci.py`: this script selects from what nox reports and names no release itself.
Each matrix entry has `session` (the name to pass to `nox -s`), `transformers`, `torch` and
`slug` (the session name made safe for an artifact name). cuda cells are always dropped:
GitHub's hosted runners have no GPU. When a subset of releases is asked for, the reference
release (`opensci_patch.matrix.spec.REFERENCE`) is kept too: the report compares every cell with it.

Standard library only: the plan job installs nothing but nox.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NO_GPU_BUILDS = ("cuda",)


def reference_release() -> str:
    """The release of the report's reference cell (from the stdlib-only `opensci_patch.matrix.spec`)."""
    sys.path.insert(0, str(REPO))
    try:
        from opensci_patch.matrix.spec import REFERENCE
    finally:
        sys.path.remove(str(REPO))
    return REFERENCE[0]


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(x) if x.isdigit() else 0 for x in version.split("."))


def slug(session: str) -> str:
    """`cell(transformers='5.2.0', torch='cpu')` -> `cell-transformers-5.2.0-torch-cpu`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", session).strip("-")


def cell_entries(listing: list[dict], tag: str = "cpu") -> list[dict]:
    """The cell sessions of `nox --list --json` output that carry `tag`, without GPU builds."""
    out = []
    for s in listing:
        spec = s.get("call_spec") or {}
        if s.get("name") != "cell" or tag not in (s.get("tags") or []):
            continue
        if spec.get("torch") in NO_GPU_BUILDS or set(s.get("tags") or []) & set(NO_GPU_BUILDS):
            continue
        out.append(
            {
                "session": s["session"],
                "transformers": spec["transformers"],
                "torch": spec["torch"],
                "slug": slug(s["session"]),
            }
        )
    return sorted(out, key=lambda e: version_key(e["transformers"]))


def select(entries: list[dict], wanted: str, reference: str) -> list[dict]:
    """Keep the releases named in `wanted` (versions, `oldest`, `newest`; empty or `all`: every one).

    `newest` is the newest release of the listing; the workflows put the package index's newest
    final release into the listing (`OPENSCI_PATCH_RELEASES` from `opensci-patch releases --newest`
    or `--sweep`), so it means the index's newest, not the newest pinned one.

    The reference release is always kept when it is in the listing. A name not in the listing is
    a ValueError (a typo in a workflow_dispatch input must not run an empty or partial matrix).
    """
    tokens = wanted.replace(",", " ").split()
    if not tokens or "all" in tokens:
        return entries
    versions = sorted({e["transformers"] for e in entries}, key=version_key)
    if not versions:
        return []
    keep = {reference} & set(versions)
    for t in tokens:
        if t == "newest":
            keep.add(versions[-1])
        elif t == "oldest":
            keep.add(versions[0])
        elif t in versions:
            keep.add(t)
        else:
            raise ValueError(f"transformers {t!r} is not a cell of the noxfile; choose from {', '.join(versions)}")
    return [e for e in entries if e["transformers"] in keep]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, help="the `nox --list --json` output (default: stdin)")
    ap.add_argument("--tag", default="cpu", help="torch-build tag of the cells to keep (default: cpu)")
    ap.add_argument("--transformers", default="", help="releases to keep: versions, oldest, newest (default: all)")
    ap.add_argument("--format", choices=("matrix", "sessions"), default="matrix")
    args = ap.parse_args(argv)

    text = args.input.read_text() if args.input else sys.stdin.read()
    try:
        listing = json.loads(text)
    except json.JSONDecodeError as exc:
        print(f"nox_matrix: input is not `nox --list --json` output: {exc}", file=sys.stderr)
        return 2
    entries = cell_entries(listing, args.tag)
    try:
        entries = select(entries, args.transformers, reference_release())
    except ValueError as exc:
        print(f"nox_matrix: {exc}", file=sys.stderr)
        return 2
    if not entries:
        print(f"nox_matrix: no cell sessions with tag {args.tag!r} in the listing", file=sys.stderr)
        return 1
    if args.format == "sessions":
        print("\n".join(e["session"] for e in entries))
    else:
        print(json.dumps({"include": entries}, separators=(",", ":")))  # one line, for $GITHUB_OUTPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
