"""How an env gets its torch: one shared link directory per torch, named by the env's ``.pth``.

Torch builds (`TORCH_BUILDS`); torch is always pinned, never resolved freely, because an unpinned
torch on Linux resolves to a multi-GB CUDA build:

- ``"system"`` (default): reuse the torch of the interpreter running opensci_patch; zero download.
  The env does not see the base's site-packages (that would leak the base's own transformers and
  everything else). Instead a shared directory under the root, ``_torch-system-<version>-<hash>``,
  holds symlinks to exactly the files of the torch distribution and of the closure of its runtime
  requirements (with their ``.dist-info``, so ``importlib.metadata`` and transformers'
  ``is_torch_available()`` find torch), and a ``.pth`` file in the env points at it. ``.pth``
  entries come after the env's own site-packages, so packages the env installs itself (its own
  ``typing_extensions``, ``filelock``, ``fsspec``...) take precedence over the linked ones.
- ``"cpu"``: the CPU torch ``TORCH_PIN`` (``torch==<pin>+cpu`` on Linux and Windows, so a CUDA
  build can never match), installed and byte-compiled once into a shared layer venv,
  ``_torch-cpu-<pin>-py<X.Y>-<hash of the base interpreter>``, and linked into every release env exactly
  like ``"system"`` (a link directory and a ``.pth``): a new release costs only transformers and its small dependencies.
  Wheels come from the find-links directories of ``PIP_FIND_LINKS`` and pip's configuration files
  (uv does not read pip's configuration, so they are passed explicitly), and from
  ``OPENSCI_PATCH_TORCH_INDEX_URL`` when set (e.g. ``https://download.pytorch.org/whl/cpu`` on GitHub Actions).
- ``"cuda"``: a GPU build of torch. With ``OPENSCI_PATCH_TORCH_INDEX_URL`` (e.g.
  ``https://download.pytorch.org/whl/cu128``) the pinned ``TORCH_PIN`` is installed from there, into
  the build's shared layer as for ``"cpu"``.
  Without it, the interpreter's own torch is linked as for ``"system"`` when it is a CUDA or ROCm
  build (GPU machines and clusters ship one; nothing is downloaded). Otherwise it is an error,
  never a silent multi-GB download of whatever PyPI offers.

A link directory ("farm", ``_torch-<kind>-<version>-<hash>``) holds symlinks to the files of one torch
distribution and of the closure of its runtime requirements, written once under a lock into a temp
directory and renamed into place; its manifest (`FARM_MANIFEST`) says it is complete. This module does not
import `opensci_patch.matrix.envs` (which imports it); both build on `opensci_patch.matrix.venv` and
`opensci_patch._util`.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from opensci_patch._util import fs, locations, procs
from opensci_patch._util.defaults import TORCH_PIN, is_torch_release, torch_pin
from opensci_patch._util.errors import EnvironmentSetupError
from opensci_patch._util.locations import MARKER
from opensci_patch.matrix import venv
from opensci_patch.matrix.venv import SCHEMA, TORCH_INDEX_VAR, Log

FARM_MANIFEST = "opensci-patch-torch.json"
TMP_MARK = ".opensci-patch-tmp"  # in a link directory being written: ours, swept once its pid is gone


def ensure_system_torch_dir(root: Path | None = None, *, log: Log = print) -> Path:
    """The shared directory of symlinks to this interpreter's torch and its requirement closure."""
    return _ensure_farm((root or locations.default_root()).expanduser().absolute(), system_torch(), "system", log)


def torch_farm(root: Path, layer, log: Log) -> Path:
    """The link directory an env's `.pth` names: of the build's shared layer, else of this interpreter's torch."""
    return _ensure_farm(root, layer, "layer", log) if layer is not None else ensure_system_torch_dir(root, log=log)


def base_interpreter() -> str:
    """The resolved path of the interpreter a layer is built on: a venv's python resolves to its base."""
    return str(Path(getattr(sys, "_base_executable", None) or sys.executable).resolve())


def torch_layer_path(torch_build: str, root: Path) -> Path:
    """The layer's directory, keyed by everything that makes it: build, pin, Python, schema and the
    resolved base interpreter. Two interpreters sharing one env root each get their own (issue 20: the
    second used to delete the first's layer while the first's cells ran on it)."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    key = hashlib.sha256(f"{SCHEMA}\n{base_interpreter()}".encode()).hexdigest()[:10]
    spec = torch_build if is_torch_release(torch_build) else f"{torch_build}-{TORCH_PIN}"  # a release: its own layer
    return root / f"_torch-{spec}-py{py}-{key}"


def ensure_torch_layer(torch_build: str, root: Path | None = None, *, log: Log = print):
    """The shared layer of an installing build: a venv holding only the pinned torch, installed and
    byte-compiled once; every release env of that build links it (`_ensure_farm`), so a new release
    costs only transformers and its small dependencies. Returns the layer's torch distribution.

    Built like an env: ours (sentinel first), marker last, serialised by a lock. Only a half-made one (no
    marker: its build was killed, so no env links it) is removed and rebuilt; a complete layer is never
    deleted, since envs started by another interpreter or checkout may be running on it.
    """
    root = venv.check_settings(root)
    path = torch_layer_path(torch_build, root)
    want = {"schema": SCHEMA, "torch_build": torch_build, "torch_pin": torch_pin(torch_build),
            "base_python": base_interpreter()}  # fmt: skip
    with fs.locked(root / f"{path.name}.lock"):
        marker = locations.read_marker(path)
        if marker is None:
            if path.exists() or path.is_symlink():
                venv.remove_ours(path, root, "half-made torch layer", log)
            _create_layer(path, root, torch_build, want, log)
        elif any(marker.get(k) != v for k, v in want.items()):
            raise EnvironmentSetupError(
                f"torch layer {path} was built for something else ({locations.MARKER} differs); it is never "
                f"deleted while envs may use it: remove it by hand when no opensci-patch run is using this env root"
            )
    found = list(metadata.distributions(name="torch", path=[str(venv.site_packages(path))]))
    if not found:
        raise EnvironmentSetupError(f"torch layer {path} holds no torch distribution; delete it and retry")
    return found[0]


def _create_layer(path: Path, root: Path, torch_build: str, want: dict[str, Any], log: Log) -> None:
    uv = procs.find_uv()
    log(f"creating the shared torch layer {path.name} (torch {torch_pin(torch_build)}, built once for every release "
        "env) ...")  # fmt: skip
    if (wheel := is_torch_release(torch_build) and local_torch_wheel(torch_build)) is not None and wheel:
        log(f"torch {torch_build} comes from this disk ({wheel}): its own wheel is not downloaded")
    elif is_torch_release(torch_build) and "+" not in torch_build and sys.platform == "linux":
        log(f"note: torch=={torch_build} is the registry's default wheel, on Linux a CUDA build: with its nvidia-* "
            "wheels about 2.9 GB to download (once, into uv's cache) and 5 GB in the layer")  # fmt: skip
    start = time.monotonic()
    venv.claim_new_dir(path, root)
    try:
        install = venv.new_venv(path, root, uv, log)
        procs.run_installer([*install, *torch_install_args(torch_build, uv=bool(uv))], root, path.name)
        from opensci_patch._util.fs import write_atomic

        write_atomic(path / MARKER, {**want, "seconds": round(time.monotonic() - start, 1)})
    except BaseException:
        fs.discard(path, root)
        raise
    log(f"created the torch layer {path.name} in {time.monotonic() - start:.1f} s")


def _ensure_farm(root: Path, torch, kind: str, log: Log) -> Path:
    """The shared directory of symlinks to `torch` (a distribution) and its requirement closure.

    Created once per (torch version, torch location) under `root`, atomically (temp dir + rename);
    re-created when a link went dangling (e.g. the base venv was rebuilt).
    """
    root.mkdir(parents=True, exist_ok=True)
    where = str(Path(torch.locate_file("")).resolve())
    digest = hashlib.sha256(f"{where}\n{torch.version}".encode()).hexdigest()[:10]
    farm = root / f"_torch-{kind}-{torch.version}-{digest}"
    if (farm / FARM_MANIFEST).exists() and (farm / "torch").exists():
        return farm
    with fs.locked(root / f"{farm.name}.lock"):
        if (farm / FARM_MANIFEST).exists() and (farm / "torch").exists():
            return farm
        dists, missing = _requirement_closure(torch, [where] if kind == "layer" else None)
        for old in fs.dead_siblings(farm, ["tmp"])["tmp"]:  # of killed runs (we hold the lock)
            if (old / TMP_MARK).is_file() or (old / FARM_MANIFEST).is_file():
                shutil.rmtree(old, ignore_errors=True)
        tmp = fs.claim_dir(fs.sibling(farm, "tmp"), TMP_MARK)
        try:
            linked = {d.metadata["Name"]: _link_distribution(d, tmp) for d in dists}
            (tmp / FARM_MANIFEST).write_text(
                json.dumps(
                    {"torch": torch.version, "site_packages": where, "linked": linked, "missing": missing}, indent=1
                )
            )
            (tmp / TMP_MARK).unlink()  # the manifest marks it as ours from here on
            if farm.exists():
                venv.remove_ours(farm, root, "dangling links", log, sentinel=FARM_MANIFEST)
            fs.publish_dir(tmp, farm)  # under the lock: a lost race only where there is no flock, to an equal farm
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if missing:
        log(f"warning: torch requires {', '.join(missing)}, not installed here; not linked")
    log(f"linked torch {torch.version} and {len(dists) - 1} requirements into {farm}")
    return farm


def links_system_torch(torch_build: str) -> bool:
    """Whether the env links the interpreter's torch ("system"; "cuda" without an index) or installs one.

    Raises for "cuda" when neither an index nor a GPU build of torch in this interpreter is there.
    """
    if torch_build == "system":
        return True
    if torch_build != "cuda" or os.environ.get(TORCH_INDEX_VAR):
        return False
    try:
        dist = metadata.distribution("torch")
    except metadata.PackageNotFoundError:
        dist = None
    gpu = _gpu_build(dist) if dist is not None else None
    if gpu is None:
        have = f"torch {dist.version} (a CPU build)" if dist is not None else "no torch"
        raise EnvironmentSetupError(
            f"torch build 'cuda' needs a GPU torch: set {TORCH_INDEX_VAR} (e.g. "
            f"https://download.pytorch.org/whl/cu128) to install torch=={TORCH_PIN} from it, or run with an "
            f"interpreter whose torch is a CUDA or ROCm build ({sys.executable} has {have})"
        )
    return True


def _gpu_build(dist) -> str | None:
    """'cuda 13.0' / 'hip 6.4' for a GPU build of torch, read from its torch/version.py; else None."""
    try:
        text = Path(dist.locate_file("torch/version.py")).read_text()
    except OSError:
        return None
    for kind in ("cuda", "hip"):
        found = re.search(rf"^{kind}\b[^=\n]*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        if found:
            return f"{kind} {found.group(1)}"
    return None


def same_torch(seen: str, base: str) -> bool:
    """`torch.__version__` inside an env against the linked distribution's version.

    PyPI's CUDA wheels carry no local label in their metadata (2.11.0) but report one at run time
    (2.11.0+cu130); a labelled distribution version (2.13.0+cpu) must match exactly.
    """
    from packaging.version import Version

    inside, linked = Version(seen), Version(base)
    return inside == linked or (linked.local is None and inside.public == linked.public)


def torch_install_args(torch_build: str, *, uv: bool = True) -> list[str]:
    """The pinned torch requirement and where it may come from, for builds that install torch.

    Beside `OPENSCI_PATCH_TORCH_INDEX_URL`, the places pip is configured to look (find-links and extra
    indexes, which uv does not read by itself), with pip's rule of the best match over all of them: a torch
    wheel on a local index is taken from there, not downloaded again from the default index."""
    index = os.environ.get(TORCH_INDEX_VAR)
    if is_torch_release(torch_build):  # the release as named, flavour and all; from the same places as the pin
        args = [f"torch=={torch_build}"]
    elif torch_build == "cuda":
        return [f"torch=={TORCH_PIN}", *(["--index" if uv else "--extra-index-url", index] if index else [])]
    else:
        cpu_label = "" if sys.platform == "darwin" else "+cpu"  # macOS wheels carry no local label
        args = [f"torch=={TORCH_PIN}{cpu_label}"]
    config = pip_config()
    for link in config["find-links"]:
        args += ["--find-links", link]
    extra = config["extra-index-url"]
    for url in extra:
        args += ["--index" if uv else "--extra-index-url", url]
    if index:
        args += ["--index" if uv else "--extra-index-url", index]
    if uv and extra:
        args += ["--index-strategy", "unsafe-best-match"]  # pip's rule; uv's default stops at the first index
    return args


def find_links() -> list[str]:
    """pip's find-links (PIP_FIND_LINKS and pip.conf files), which uv does not read by itself."""
    return pip_config()["find-links"]


def pip_config() -> dict[str, list[str]]:
    """pip's find-links and extra index URLs: its environment variables, then its configuration files."""
    out = {
        "find-links": os.environ.get("PIP_FIND_LINKS", "").split(),
        "extra-index-url": os.environ.get("PIP_EXTRA_INDEX_URL", "").split(),
    }
    for file in pip_config_files():
        parser = configparser.ConfigParser()
        try:
            parser.read(file)
        except (configparser.Error, OSError):
            continue
        for key, values in out.items():
            for section in ("global", "install"):
                for name in (key, key.replace("-", "_")):
                    values += parser.get(section, name, fallback="").split()
    return {k: list(dict.fromkeys(v)) for k, v in out.items()}


def pip_config_files() -> list[Path]:
    """pip's configuration files, global to user, then `PIP_CONFIG_FILE`."""
    config_dirs = os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(os.pathsep)
    files = [Path(d) / "pip" / "pip.conf" for d in config_dirs] + [
        Path("/etc/pip.conf"),
        Path.home() / ".pip" / "pip.conf",
        Path.home() / ".config" / "pip" / "pip.conf",
    ]
    if cfg := os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(cfg))
    return files


def local_torch_wheel(spec: str) -> str | None:
    """A torch wheel of release `spec` for this Python and platform on this disk (a find-links directory or a
    `file://` index pip is configured with), or None: installing it downloads no torch."""
    from packaging.tags import sys_tags
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename
    from packaging.version import Version

    config = pip_config()
    places = [Path(d).expanduser() for d in config["find-links"]]
    places += [Path(u.removeprefix("file://")) / "torch" for u in config["extra-index-url"] if u.startswith("file://")]
    tags = set(sys_tags())
    for place in places:
        files = {p.name: p for p in place.glob("*.whl")}
        if (place / "index.html").is_file():  # a simple index's project page: links to the files
            page = (place / "index.html").read_text(errors="replace")
            files |= {Path(h).name: (place / h).resolve() for h in re.findall(r'href="([^"#]+\.whl)', page)}
        for name, path in files.items():
            try:
                project, version, _, wheel_tags = parse_wheel_filename(name)
            except InvalidWheelFilename:
                continue
            if project == "torch" and version == Version(spec) and wheel_tags & tags and path.is_file():
                return str(path)
    return None


def system_torch():
    try:
        return metadata.distribution("torch")
    except metadata.PackageNotFoundError:
        raise EnvironmentSetupError(
            f"torch build 'system' reuses the torch of {sys.executable}, which has none: install torch there "
            f"or choose the 'cpu' build"
        ) from None


def _requirement_closure(top, path: list[str] | None = None) -> tuple[list, list[str]]:
    """`top` and every distribution it needs at runtime (markers evaluated, no extras), looked up in
    `path` (site-packages directories; default: this interpreter's)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, Any] = {canonicalize_name(top.metadata["Name"]): top}
    missing: list[str] = []
    queue = [top]
    while queue:
        dist = queue.pop()
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            key = canonicalize_name(req.name)
            if key in seen or req.name in missing:
                continue
            found = (
                list(metadata.distributions(name=req.name, path=path))
                if path is not None
                else list(metadata.distributions(name=req.name))
            )
            if not found:
                missing.append(req.name)
                continue
            seen[key] = found[0]
            queue.append(seen[key])
    return list(seen.values()), missing


def _link_distribution(dist, farm: Path) -> list[str]:
    """Symlink a distribution's top-level modules/packages and its .dist-info into `farm`."""
    names: set[str] = set()
    pycache: set[str] = set()
    for file in dist.files or []:
        first = file.parts[0]
        if first == ".." or first.endswith((".pth", ".egg-link")):
            continue  # console scripts, data outside site-packages, path hooks
        if first == "__pycache__":
            if len(file.parts) == 2:
                pycache.add(file.parts[1])  # compiled single-file module, e.g. typing_extensions
            continue
        names.add(first)
    if not names:  # no RECORD: fall back to top_level.txt
        names = set((dist.read_text("top_level.txt") or "").split())
    linked = []
    for n in sorted(names):
        src = Path(dist.locate_file(n))
        if not src.exists() and Path(dist.locate_file(f"{n}.py")).exists():
            src = Path(dist.locate_file(f"{n}.py"))  # top_level.txt names a single-file module
        if src.exists() and not (farm / src.name).exists():
            (farm / src.name).symlink_to(src)
            linked.append(src.name)
    for n in sorted(pycache):
        src = Path(dist.locate_file(f"__pycache__/{n}"))
        if src.exists():
            (farm / "__pycache__").mkdir(exist_ok=True)
            (farm / "__pycache__" / n).symlink_to(src)
    return linked
