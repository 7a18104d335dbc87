"""`cell --torch-sweep`: the torch releases each transformers release runs on, planned before any download.

For each transformers release (default: the reference release and the newest pinned one): the oldest torch it
supports (its own `torch>=` minimum, `measure.torch_support.torch_requirement`, read from a built env of the
release or from its wheel), the pinned torch (`TORCH_PIN` + `+cpu`) and the newest torch on the torch index.
The torch index is `OPENSCI_PATCH_TORCH_INDEX_URL` (PyTorch's CPU index on GitHub: `+cpu` wheels, ~0.2 GB
each) or the package index (its default wheels: on Linux CUDA builds of ~2.9 GB with their nvidia-* wheels,
which run on the CPU too). Only releases with a wheel for this Python are candidates. `plan` asks the index
once; `announce` prints the pairs and the planned downloads (what is neither in a find-links directory nor
in a built torch layer) before anything is installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from email.parser import Parser
from importlib import metadata
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from opensci_patch._util import locations, procs
from opensci_patch._util.defaults import TORCH_PIN
from opensci_patch._util.errors import OpensciPatchError
from opensci_patch.matrix import releases, torch_links, venv
from opensci_patch.matrix.spec import REFERENCE
from opensci_patch.matrix.venv import TORCH_INDEX_VAR
from opensci_patch.measure.torch_support import torch_requirement

GB = {"cpu": 0.2, "default": 2.9}  # download estimates per torch: a `+cpu` wheel, a registry default (CUDA) wheel
WHEEL = re.compile(r"^torch-([^-]+)-(cp\d+)-[^-]+-[^-]+\.whl$")


def index_torches(timeout: float = 20) -> list[str]:
    """The torch releases on the torch index with a wheel for this Python, as specs, oldest first: the `+cpu`
    wheel where the index has one (PyTorch's CPU index), else the unlabelled one (the registry's)."""
    url = os.environ.get(TORCH_INDEX_VAR) or releases.index_url()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    best: dict[Version, str] = {}
    for name, yanked in releases._project_files(url, timeout, "torch"):
        m = WHEEL.match(name)
        try:
            v = Version(m[1]) if m and m[2] == tag and not yanked else None
        except InvalidVersion:
            continue
        if v is None or v.is_prerelease or v.is_devrelease or v.local not in (None, "cpu"):
            continue
        if v.local == "cpu" or Version(v.public) not in best:
            best[Version(v.public)] = str(v)
    if not best:
        raise OpensciPatchError(f"{url}/torch/ lists no torch wheel for {tag}")
    return [best[k] for k in sorted(best)]


def release_requirement(version: str, root: Path | None = None) -> str | None:
    """transformers `version`'s torch requirement: from a built env of it, else from its wheel (pip download)."""
    base = (root or locations.default_root()).expanduser()
    for env in sorted(base.glob(f"tf{version}-*")):
        if (env / locations.MARKER).is_file():
            for dist in metadata.distributions(name="transformers", path=[str(venv.site_packages(env))]):
                return torch_requirement(list(dist.requires or []))
    with tempfile.TemporaryDirectory(prefix="opensci-tf-meta-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", tmp,
               f"transformers=={version}"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=procs.child_env(source=False))
        wheels = list(Path(tmp).glob("transformers-*.whl"))
        if proc.returncode or not wheels:
            raise OpensciPatchError(f"cannot read transformers {version}'s torch requirement: pip download failed "
                                    f"({(proc.stderr.strip().splitlines() or ['no wheel'])[-1]})")  # fmt: skip
        with zipfile.ZipFile(wheels[0]) as whl:
            name = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
            meta = Parser().parsestr(whl.read(name).decode())
    return torch_requirement(meta.get_all("Requires-Dist") or [])


def plan(
    versions: Iterable[str],
    *,
    torches: Callable[[], list[str]] | None = None,
    requirement: Callable[[str], str | None] | None = None,
) -> dict[str, list[str]]:
    """transformers release -> its torch specs, oldest first: the oldest it supports, the pin, the newest; the
    reference release also every other release's torch that it supports (its cells are their references).
    `torches`, `requirement`: default `index_torches`, `release_requirement` (looked up when called)."""
    available = (torches or index_torches)()
    requirement = requirement or release_requirement
    pin = f"{TORCH_PIN}+cpu"
    out: dict[str, list[str]] = {}
    supports: dict[str, SpecifierSet] = {}
    for v in versions:
        wanted = requirement(v)
        supports[v] = spec = SpecifierSet(wanted.removeprefix("torch") if wanted else "")
        oldest = next((t for t in available if spec.contains(Version(t).public, prereleases=True)), None)
        if oldest is None:
            raise OpensciPatchError(f"transformers {v} requires {wanted}: no such torch on the torch index")
        picked: dict[str, str] = {}
        for t in (pin, oldest, available[-1]):  # the pin first: the same release under another flavour is the pin
            picked.setdefault(Version(t).public, t)
        out[v] = sorted(picked.values(), key=Version)
    if (ref := REFERENCE[0]) in out:  # every cell is judged against the reference release on its own torch
        every = {t for torches in out.values() for t in torches}
        out[ref] = sorted((t for t in every if supports[ref].contains(Version(t).public, True)), key=Version)
    return out


def downloads(pairs: dict[str, list[str]], root: Path | None = None) -> list[str]:
    """The torch specs of `pairs` that are neither a wheel in a find-links directory nor a built torch layer."""
    base = (root or locations.default_root()).expanduser()
    out = []
    for spec in sorted({t for torches in pairs.values() for t in torches}, key=Version):
        built = (torch_links.torch_layer_path(spec, base) / locations.MARKER).is_file()
        if not (built or torch_links.local_torch_wheel(spec)):
            out.append(spec)
    return out


def announce(versions: list[str], log: Callable[[str], None], **kw) -> dict[str, list[str]]:
    """`plan` for `versions`, printed with the planned downloads (count and size estimate) before any."""
    pairs = plan(versions, **kw)
    for v, torches in pairs.items():
        log(f"torch sweep: transformers {v} on torch {', '.join(torches)}")
    todo = downloads(pairs)
    sizes = [GB["cpu" if t.endswith("+cpu") else "default"] for t in todo]
    listed = ", ".join(f"{t} (~{gb} GB)" for t, gb in zip(todo, sizes, strict=True)) or "none"
    log(f"torch sweep: {len(todo)} torch release(s) to download: {listed}; about {sum(sizes):.1f} GB in all, once "
        "into uv's cache (less where it has them)")  # fmt: skip
    return pairs
