"""Release bisection: the first transformers release where a cell's logits leave the fp64 reference.

A release is *good* when the cell (torch build, model variant) loads, runs, and its
last-position logits agree with the independent fp64 reference forward
(`opensci_patch.measure.reference`) to within the dtype's noise; *bad* otherwise. The oracle is the
reference, not "whatever 4.x said", so bisection never assumes which side is right.

Every probed release gets its own reused environment (`envs`), so a second bisect over the
same range installs nothing. The driver needs only the standard library (plus `packaging`).

A cell that could not run (environment, hotfix, crash) says nothing about the release's
logits, so it stops the search with its reason instead of being counted as bad.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from packaging.version import Version

from opensci_patch._util.errors import OpensciPatchError
from opensci_patch.matrix import releases
from opensci_patch.matrix.runner import run_cell
from opensci_patch.matrix.spec import Cell
from opensci_patch.measure import records
from opensci_patch.measure.records import Record
from opensci_patch.results.verdict import within_fp64_tolerance

# Good = `verdict.within_fp64_tolerance`: max |logit - fp64 ref| within diagnose's stage tolerance for the dtype
# (one definition). fp32 eager on CPU agrees with fp64 to ~4e-6 on the shipped checkpoint; broken RoPE is > 1.


@dataclass
class Probe:
    version: str
    good: bool
    why: str
    record: Path


def released_versions(timeout: float = 30) -> list[str]:
    """Final (non pre-release), non-yanked transformers releases on the package index, oldest first.

    The index is `releases.index_url()` ($OPENSCI_PATCH_INDEX_URL, pip's or uv's, else PyPI), read as
    `opensci-patch releases` reads it."""
    try:
        versions = releases.index_versions(timeout)
    except releases.IndexUnreachable as exc:
        raise OpensciPatchError(f"cannot list transformers releases ({exc}); pass --versions") from None
    return [str(v) for v in versions if not v.is_prerelease and not v.is_devrelease]


def release(value: str, flag: str) -> Version:
    """A release number given on the command line (`releases.canonical`), or one line saying what was expected."""
    return Version(releases.canonical(value, what=flag))


def between(versions: list[str], good: str, bad: str) -> list[str]:
    """Releases from `good` to `bad` inclusive, oldest first."""
    g, b = release(good, "--good"), release(bad, "--bad")
    if g >= b:
        raise OpensciPatchError(f"--good {good} must be older than --bad {bad}")
    span = [v for v in sorted(set(versions) | {good, bad}, key=Version) if g <= Version(v) <= b]
    return span


def is_good(record: Record) -> tuple[bool, str]:
    """Good = ran and agrees with the fp64 reference within the dtype's tolerance.

    A cell that could not run, or never finished, is no evidence either way: OpensciPatchError.
    """
    if record.status.no_evidence:
        err = record.error
        raise OpensciPatchError(
            f"cannot judge transformers {record.environment.get('transformers', '?')}: {record.status}: "
            f"{err.message if err else ''}; fix it (see the record) and re-run"
        )
    return within_fp64_tolerance(record)


def bisect(
    good: str,
    bad: str,
    *,
    torch_build: str = "cpu",
    variant: str = "structural",
    model_dir: Path,
    versions: list[str] | None = None,
    work: Path | None = None,
    log: Callable[[str], object] = print,
) -> tuple[str, str, list[Probe]]:
    """Return (last good release, first bad release, probes in the order they ran)."""
    good, bad = str(release(good, "--good")), str(release(bad, "--bad"))  # a typo fails before the index is read
    if versions is not None:  # the CLI checked that they exist (`releases.check_known`)
        versions = [str(release(v, "--versions")) for v in versions]
    else:
        versions = released_versions()
        unknown = [v for v in (good, bad) if v not in versions]
        if unknown:  # before any cell runs: an unknown release would cost an env build and an installer's tail
            raise OpensciPatchError(f"transformers {', '.join(unknown)}: no such final release on PyPI")
    span = between(versions, good, bad)
    work = work or Path(tempfile.mkdtemp(prefix="opensci-bisect-"))
    log(f"bisecting {len(span)} releases {span[0]} .. {span[-1]} (variant {variant}, torch {torch_build})")
    probes: list[Probe] = []
    cache: dict[str, bool] = {}

    def probe(v: str) -> bool:
        if v not in cache:
            path = run_cell(Cell(v, torch_build, variant), model_dir, work / "records", log=lambda m: log(f"    {m}"))
            ok, why = is_good(records.load(path))
            probes.append(Probe(v, ok, why, path))
            cache[v] = ok
            log(f"  {v}: {'good' if ok else 'BAD'} ({why})")
        return cache[v]

    if not probe(span[0]):
        raise OpensciPatchError(f"--good {good} is not good: {probes[-1].why}")
    if probe(span[-1]):
        raise OpensciPatchError(f"--bad {bad} is not bad: {probes[-1].why}")
    lo, hi = 0, len(span) - 1  # invariant: span[lo] good, span[hi] bad
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if probe(span[mid]) else (lo, mid)
    log(f"first bad release: {span[hi]} (last good: {span[lo]}; {len(probes)} releases probed)")
    return span[lo], span[hi], probes
