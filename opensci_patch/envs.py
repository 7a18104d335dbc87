"""One isolated Python environment per (transformers release, torch build), created once and reused.

Every matrix cell, the cross-version tests and `bisect` run their code in such an environment, in
a child process (`run_python`), so that each cell sees exactly one transformers release and no
package of the interpreter running opensci_patch leaks in.

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
  ``_torch-cpu-<pin>-py<X.Y>``, and linked into every release env exactly like ``"system"`` (a
  link directory and a ``.pth``): a new release costs only transformers and its small dependencies.
  Wheels come from the find-links directories of ``PIP_FIND_LINKS`` and pip's configuration files
  (uv does not read pip's configuration, so they are passed explicitly), and from
  ``OPENSCI_PATCH_TORCH_INDEX_URL`` when set (e.g. ``https://download.pytorch.org/whl/cpu`` on GitHub Actions).
- ``"cuda"``: a GPU build of torch. With ``OPENSCI_PATCH_TORCH_INDEX_URL`` (e.g.
  ``https://download.pytorch.org/whl/cu128``) the pinned ``TORCH_PIN`` is installed from there, into
  the build's shared layer as for ``"cpu"``.
  Without it, the interpreter's own torch is linked as for ``"system"`` when it is a CUDA or ROCm
  build (GPU machines and clusters ship one; nothing is downloaded). Otherwise it is an error,
  never a silent multi-GB download of whatever PyPI offers.

Offline machines (a GPU node without network, an air-gapped cluster): ``OPENSCI_PATCH_WHEELS=DIR``
makes every install ``--no-index --find-links DIR``, so transformers, its dependencies and
opensci_patch's own come from that directory of wheels only (``pip download`` them elsewhere for
the target's Python and platform; README, "Offline and GPU machines").

Layout: ``<root>/tf<release>-<build>-py<X.Y>/`` with ``opensci-patch-env.json`` (the marker)
written last, after a successful install and a check that ``import torch`` and
``transformers.is_torch_available()`` work inside. The root is ``$OPENSCI_PATCH_ENV_ROOT``, else
``$XDG_CACHE_HOME/opensci-patch/envs`` (``~/.cache/opensci-patch/envs``). A directory without a
marker is a half-made env (Ctrl-C, a killed driver, a crash) and is removed and rebuilt, but only
when it is ours (``.opensci-patch-env`` written first, or our ``.pth``). Removal first renames the
directory aside (``.trash-<name>-<pid>-<hex>``, swept by later builds), so an installer that outlived
a killed driver and still writes into it can neither make the removal fail nor leave a directory
that no longer looks like ours; on Linux installer children also get ``PR_SET_PDEATHSIG`` and die
with the driver. Creation is serialised per env with ``fcntl.flock`` on ``<root>/<name>.lock``
(pytest-xdist workers may ask for the same env at once).

Which ``opensci_patch`` a child runs: `child_env()` puts the caller's own source tree first on
``PYTHONPATH``, so two checkouts (two branches, CI and a local run) sharing one env root each run
their own code. The env's ``_opensci_patch_src.pth`` (the last caller's tree) is only a fallback
for children started without `child_env()`.

Besides transformers, the env gets opensci_patch's own runtime dependencies (``[project]
dependencies`` of pyproject.toml: libcst, safetensors, tabulate) so that ``python -m opensci_patch.cli
hotfix`` and ``capture`` both run inside it; the marker records them, so changing them rebuilds the env.

Installer: uv when available (``uv`` on PATH or the ``uv`` Python package), with
``--compile-bytecode`` (with ``PYTHONDONTWRITEBYTECODE=1`` an uncompiled transformers costs 3x per
import); otherwise ``python -m venv`` + pip (which compiles by default).
"""

from __future__ import annotations

import configparser
import datetime
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from glob import escape as glob_escape
from importlib import metadata
from pathlib import Path
from typing import Any

from opensci_patch.defaults import TORCH_BUILDS, TORCH_PIN
from opensci_patch.errors import EnvironmentSetupError
from opensci_patch.faults import fault_point

TORCH_INDEX_VAR = "OPENSCI_PATCH_TORCH_INDEX_URL"
WHEELS_VAR = "OPENSCI_PATCH_WHEELS"
ROOT_VAR = "OPENSCI_PATCH_ENV_ROOT"

MARKER = "opensci-patch-env.json"  # written last: its presence means "complete"
SENTINEL = ".opensci-patch-env"  # written first: "this directory is ours"
SCHEMA = 1
SRC_PTH = "_opensci_patch_src.pth"
TORCH_PTH = "_opensci_patch_torch.pth"
FARM_MANIFEST = "opensci-patch-torch.json"
INSTALL_TIMEOUT = 1800.0
TAIL_LINES = 20

SRC_ROOT = Path(__file__).resolve().parents[1]  # the directory holding the opensci_patch package

Log = Callable[[str], None]

# Run inside the env: the versions it really sees (one process; HF offline, quiet).
_PROBE = """\
import json, platform
out = {"python": platform.python_version()}
import torch
out["torch"] = torch.__version__
import transformers
from transformers.utils import is_torch_available
out["transformers"] = transformers.__version__
out["torch_available"] = bool(is_torch_available())
print("OPENSCI_PATCH_PROBE " + json.dumps(out))
"""


@dataclass
class Env:
    """A ready environment: run code in it with `run_python`."""

    path: Path
    python: Path
    transformers_version: str
    torch_build: str
    reused: bool


def default_root() -> Path:
    """Where environments live: $OPENSCI_PATCH_ENV_ROOT, else the user cache directory."""
    if value := os.environ.get(ROOT_VAR):
        return Path(value).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "opensci-patch" / "envs"


def env_name(transformers_version: str, torch_build: str) -> str:
    """Directory name of an env, e.g. ``tf4.48.0-system-py3.11``."""
    return f"tf{transformers_version}-{torch_build}-py{sys.version_info[0]}.{sys.version_info[1]}"


def ensure_env(transformers_version: str, torch_build: str, *, root: Path | None = None, log: Log = print) -> Env:
    """Return the env for this release and torch build, creating it on first use.

    A warm call reads the marker and runs no installer (milliseconds). Raises
    `EnvironmentSetupError` when the env cannot be made; nothing half-made is left behind.
    """
    version = _check_version(transformers_version)
    if torch_build not in TORCH_BUILDS:
        raise EnvironmentSetupError(f"unknown torch build {torch_build!r}: choose one of {', '.join(TORCH_BUILDS)}")
    root = (root or default_root()).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    name = env_name(version, torch_build)
    path = root / name
    expected: dict[str, Any] = {
        "schema": SCHEMA,
        "name": name,
        "transformers_requested": version,
        "torch_build": torch_build,
        "requirements": _package_requirements(),
    }
    # "torch": the linked torch's version; every env links one: the interpreter's ("system"), or the shared
    # layer of its build, where the pinned torch is installed and byte-compiled once ("torch_pin" set)
    _wheel_dir_args()  # fail early: OPENSCI_PATCH_WHEELS names no directory
    if _links_system_torch(torch_build):
        expected["torch"] = _system_torch().version
        layer = None
    else:
        expected["torch_pin"] = TORCH_PIN
        _torch_install_args(torch_build)  # fail early: e.g. a bad index
        layer = ensure_torch_layer(torch_build, root, log=log)
        expected["torch"] = layer.version

    with _locked(root / f"{name}.lock"):
        marker = _read_marker(path)
        if marker is not None and all(marker.get(k) == v for k, v in expected.items()) and _python(path).exists():
            _write_pths(path, _torch_farm(root, layer, log), log=log)
            log(f"reusing env {name} ({path})")
            return Env(path, _python(path), version, torch_build, reused=True)
        if path.exists() or path.is_symlink():
            why = "stale (built for something else)" if marker is not None else "half-made (no marker)"
            _remove_ours(path, root, why, log)
        _create(path, root, version, torch_build, expected, _torch_farm(root, layer, log), log)
        return Env(path, _python(path), version, torch_build, reused=False)


def run_python(
    env: Env,
    args: list[str],
    *,
    env_vars: dict[str, str] | None = None,
    timeout: float | None = None,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``env.python *args``; stdout/stderr captured as text, in `child_env` (this source tree, no PYTHONHOME)."""
    return subprocess.run(
        [str(env.python), *args],
        env=child_env(env_vars, root=env.path.parent),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def child_env(extra: dict[str, str] | None = None, *, root: Path | None = None, source: bool = True) -> dict[str, str]:
    """The environment for a child process: os.environ without PYTHONPATH/PYTHONHOME, plus `extra`.

    With `source` (default) PYTHONPATH is exactly the directory holding this process's own
    `opensci_patch` (the checkout, or a one-link directory under `root` for an installed copy), so
    the child runs the caller's code and nothing else of the caller's path leaks in; PYTHONPATH comes
    before the env's site-packages and its `.pth` files, whichever checkout wrote those last. Installers
    get `source=False`.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    if source:
        env["PYTHONPATH"] = str(_source_dir((root or default_root()).expanduser().absolute()))
    env.update(extra or {})
    return env


def installed_versions(env: Env) -> dict[str, Any]:
    """Versions seen inside the env (one child process): python, torch, transformers, torch_available."""
    proc = run_python(
        env, ["-c", _PROBE], env_vars={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}, timeout=600
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("OPENSCI_PATCH_PROBE "):
            return json.loads(line.split(" ", 1)[1])
    raise EnvironmentSetupError(
        f"env {env.path.name}: `import torch, transformers` failed inside it (exit {proc.returncode}); "
        f"remove {env.path} and retry.\n{_tail(proc.stdout + proc.stderr)}"
    )


def ensure_system_torch_dir(root: Path | None = None, *, log: Log = print) -> Path:
    """The shared directory of symlinks to this interpreter's torch and its requirement closure."""
    return _ensure_farm((root or default_root()).expanduser().absolute(), _system_torch(), "system", log)


def _torch_farm(root: Path, layer, log: Log) -> Path:
    """The link directory an env's `.pth` names: of the build's shared layer, else of this interpreter's torch."""
    return _ensure_farm(root, layer, "layer", log) if layer is not None else ensure_system_torch_dir(root, log=log)


def ensure_torch_layer(torch_build: str, root: Path | None = None, *, log: Log = print):
    """The shared layer of an installing build: a venv holding only the pinned torch, installed and
    byte-compiled once; every release env of that build links it (`_ensure_farm`), so a new release
    costs only transformers and its small dependencies. Returns the layer's torch distribution.

    Built like an env: ours (sentinel first), marker last, serialised by a lock, a half-made or stale
    one removed and rebuilt.
    """
    root = (root or default_root()).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    path = root / f"_torch-{torch_build}-{TORCH_PIN}-py{py}"
    want = {"schema": SCHEMA, "torch_build": torch_build, "torch_pin": TORCH_PIN, "base_python": sys.executable}
    with _locked(root / f"{path.name}.lock"):
        marker = _read_marker(path)
        if marker is None or any(marker.get(k) != v for k, v in want.items()) or not _python(path).exists():
            if path.exists() or path.is_symlink():
                _remove_ours(path, root, "stale or half-made torch layer", log)
            _create_layer(path, root, torch_build, want, log)
    found = list(metadata.distributions(name="torch", path=[str(_site_packages(path))]))
    if not found:
        raise EnvironmentSetupError(f"torch layer {path} holds no torch distribution; delete it and retry")
    return found[0]


def _create_layer(path: Path, root: Path, torch_build: str, want: dict[str, Any], log: Log) -> None:
    uv = _find_uv()
    log(f"creating the shared torch layer {path.name} (torch {TORCH_PIN}, built once for every release env) ...")
    start = time.monotonic()
    _sweep_trash(root)
    path.mkdir()
    (path / SENTINEL).write_text(f"created by opensci_patch.envs (pid {os.getpid()}); safe to delete\n")
    try:
        if uv:
            _run_installer(
                [uv, "venv", "--allow-existing", "--no-project", "--python", sys.executable, str(path)], root, path.name
            )
            install = [uv, "pip", "install", "--python", str(_python(path)), "--compile-bytecode"]
        else:
            install = _make_venv(path, root, log)
        _run_installer([*install, *_wheel_dir_args(), *_torch_install_args(torch_build, uv=bool(uv))], root, path.name)
        from .records import write_atomic

        write_atomic(path / MARKER, {**want, "seconds": round(time.monotonic() - start, 1)})
    except BaseException:
        _discard(path, root)
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
    with _locked(root / f"{farm.name}.lock"):
        if (farm / FARM_MANIFEST).exists() and (farm / "torch").exists():
            return farm
        dists, missing = _requirement_closure(torch, [where] if kind == "layer" else None)
        for old in root.glob(f".tmp-{glob_escape(farm.name)}-*"):  # of killed runs (we hold the lock)
            if old.name.rpartition("-")[2].isdigit() and not _pid_alive(int(old.name.rpartition("-")[2])):
                shutil.rmtree(old, ignore_errors=True)
        tmp = root / f".tmp-{farm.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            linked = {d.metadata["Name"]: _link_distribution(d, tmp) for d in dists}
            (tmp / FARM_MANIFEST).write_text(
                json.dumps(
                    {"torch": torch.version, "site_packages": where, "linked": linked, "missing": missing}, indent=1
                )
            )
            if farm.exists():
                _remove_ours(farm, root, "dangling links", log, sentinel=FARM_MANIFEST)
            tmp.rename(farm)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if missing:
        log(f"warning: torch requires {', '.join(missing)}, not installed here; not linked")
    log(f"linked torch {torch.version} and {len(dists) - 1} requirements into {farm}")
    return farm


# ---------------------------------------------------------------------------------------------
# creation


def _create(
    path: Path, root: Path, version: str, torch_build: str, expected: dict[str, Any], torch_dir: Path, log: Log
) -> None:
    uv = _find_uv()
    log(f"creating env {path.name} ({'uv' if uv else 'venv + pip'}) in {root} ...")
    start = time.monotonic()
    _sweep_trash(root)
    path.mkdir()
    (path / SENTINEL).write_text(f"created by opensci_patch.envs (pid {os.getpid()}); safe to delete\n")
    try:
        fault_point("env.created")
        python = _python(path)
        if uv:
            _run_installer(
                [uv, "venv", "--allow-existing", "--no-project", "--python", sys.executable, str(path)], root, path.name
            )
            install = [uv, "pip", "install", "--python", str(python), "--compile-bytecode"]
        else:
            install = _make_venv(path, root, log)
        install += _wheel_dir_args()
        _write_pths(path, torch_dir, log=log)
        _run_installer([*install, f"transformers=={version}", *expected["requirements"]], root, path.name)
        fault_point("env.installed")
        env = Env(path, python, version, torch_build, reused=False)
        seen = installed_versions(env)
        _check_installed(env, seen, expected)
        marker = {
            **expected,
            "transformers": seen["transformers"],
            # a linked torch keeps its distribution version (what `expected` compares on reuse)
            "torch": expected.get("torch", seen["torch"]),
            "torch_runtime": seen["torch"],
            "python": seen["python"],
            "base_python": sys.executable,
            "installer": "uv" if uv else "pip",
            "torch_dir": str(torch_dir) if torch_dir else None,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - start, 1),
        }
        fault_point("env.marker")
        from .records import write_atomic

        write_atomic(path / MARKER, marker)  # whole or absent, also across a power cut (fsync)
    except BaseException:
        _discard(path, root)
        raise
    log(
        f"created env {path.name} in {time.monotonic() - start:.1f} s "
        f"(transformers {seen['transformers']}, torch {seen['torch']})"
    )


def _make_venv(path: Path, root: Path, log: Log) -> list[str]:
    """`python -m venv` (no uv here); returns the install command prefix for the new env.

    A base Python without ensurepip (Debian/Ubuntu without python3-venv, some GPU images) cannot
    seed pip: then the env is made `--without-pip` and this interpreter's pip installs into it
    (`pip --python`, pip >= 22.3).
    """
    python = _python(path)
    try:
        _run_installer([sys.executable, "-m", "venv", str(path)], root, path.name)
    except EnvironmentSetupError as exc:
        if "ensurepip" not in str(exc):
            raise
        log(f"env {path.name}: this Python has no ensurepip; making the env without pip and using {sys.executable}'s")
        _run_installer([sys.executable, "-m", "venv", "--without-pip", str(path)], root, path.name)
        return [sys.executable, "-m", "pip", "--python", str(python), "install", "--disable-pip-version-check",
                "--no-input"]  # fmt: skip
    return [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]


def _check_installed(env: Env, seen: dict[str, Any], expected: dict[str, Any]) -> None:
    from packaging.version import Version

    problems = []
    if Version(seen["transformers"]) != Version(env.transformers_version):
        problems.append(f"transformers {seen['transformers']} installed, {env.transformers_version} asked for")
    if not seen["torch_available"]:
        problems.append("transformers.is_torch_available() is False")
    torch_local = Version(seen["torch"]).local or ""
    pinned = "torch_pin" in expected  # linked from the build's shared layer, which installed the pin
    if not _same_torch(seen["torch"], expected["torch"]):
        problems.append(f"torch {seen['torch']} seen inside, {expected['torch']} linked")
    elif pinned and Version(seen["torch"]).public != Version(TORCH_PIN).public:
        problems.append(f"torch {seen['torch']} installed, {TORCH_PIN} pinned")
    elif pinned and env.torch_build == "cuda" and not torch_local.startswith(("cu", "rocm")):
        problems.append(f"torch {seen['torch']} installed, a CUDA build asked for (check {TORCH_INDEX_VAR})")
    if problems:
        raise EnvironmentSetupError(f"env {env.path.name} is not what was asked for: {'; '.join(problems)}")


def _links_system_torch(torch_build: str) -> bool:
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


def _wheel_dir_args() -> list[str]:
    """``--no-index --find-links DIR`` when $OPENSCI_PATCH_WHEELS names a directory of wheels."""
    value = os.environ.get(WHEELS_VAR)
    if not value:
        return []
    wheels = Path(value).expanduser().absolute()
    if not wheels.is_dir():
        raise EnvironmentSetupError(f"{WHEELS_VAR}={value} is not a directory (it should hold the wheels to install)")
    return ["--no-index", "--find-links", str(wheels)]


def _same_torch(seen: str, base: str) -> bool:
    """`torch.__version__` inside an env against the linked distribution's version.

    PyPI's CUDA wheels carry no local label in their metadata (2.11.0) but report one at run time
    (2.11.0+cu130); a labelled distribution version (2.13.0+cpu) must match exactly.
    """
    from packaging.version import Version

    inside, linked = Version(seen), Version(base)
    return inside == linked or (linked.local is None and inside.public == linked.public)


def _torch_install_args(torch_build: str, *, uv: bool = True) -> list[str]:
    """The pinned torch requirement and where it may come from, for builds that install torch."""
    index = os.environ.get(TORCH_INDEX_VAR)
    if torch_build == "cuda":
        args = [f"torch=={TORCH_PIN}"]
    else:
        cpu_label = "" if sys.platform == "darwin" else "+cpu"  # macOS wheels carry no local label
        args = [f"torch=={TORCH_PIN}{cpu_label}"]
        for link in _find_links():
            args += ["--find-links", link]
    if index:
        args += ["--index" if uv else "--extra-index-url", index]
    return args


def _package_requirements() -> list[str]:
    """opensci_patch's own runtime requirements (never torch: that comes only from the chosen build)."""
    from packaging.requirements import Requirement

    reqs: list[str] = []
    try:
        import tomllib

        reqs = tomllib.loads((SRC_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    except (ImportError, OSError, KeyError, ValueError):
        try:
            reqs = [r for r in metadata.requires("opensci-patch") or [] if "extra ==" not in r]
        except metadata.PackageNotFoundError:
            pass
    return sorted(r for r in reqs if Requirement(r).name.lower() not in ("torch", "transformers"))


def _find_links() -> list[str]:
    """pip's find-links (PIP_FIND_LINKS and pip.conf files), which uv does not read by itself."""
    links = os.environ.get("PIP_FIND_LINKS", "").split()
    config_dirs = os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(os.pathsep)
    files = [Path(d) / "pip" / "pip.conf" for d in config_dirs] + [
        Path("/etc/pip.conf"),
        Path.home() / ".pip" / "pip.conf",
        Path.home() / ".config" / "pip" / "pip.conf",
    ]
    if cfg := os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(cfg))
    for file in files:
        parser = configparser.ConfigParser()
        try:
            parser.read(file)
        except (configparser.Error, OSError):
            continue
        for section in ("global", "install"):
            for key in ("find-links", "find_links"):
                links += parser.get(section, key, fallback="").split()
    return list(dict.fromkeys(links))


def _find_uv() -> str | None:
    if found := shutil.which("uv"):
        return found
    try:
        from uv import find_uv_bin
    except ImportError:
        return None
    try:
        return find_uv_bin()
    except FileNotFoundError:
        return None


def _run_installer(cmd: list[str], cwd: Path, name: str) -> None:
    env = child_env({"UV_PYTHON_DOWNLOADS": "never"}, source=False)
    env.pop("VIRTUAL_ENV", None)
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=INSTALL_TIMEOUT,
            preexec_fn=_death_signal_setter(),
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else (exc.output or "")
        raise EnvironmentSetupError(
            f"env {name}: `{shlex.join(cmd)}` took over {INSTALL_TIMEOUT:.0f} s; check the network or index."
            f"\n{_tail(out)}"
        ) from None
    except OSError as exc:
        raise EnvironmentSetupError(f"env {name}: cannot run `{shlex.join(cmd)}`: {exc}") from None
    if proc.returncode != 0:
        raise EnvironmentSetupError(
            f"env {name}: `{shlex.join(cmd)}` failed (exit {proc.returncode}); check that the release exists "
            f"and the index is reachable. Last output:\n{_tail(proc.stdout)}"
        )


# ---------------------------------------------------------------------------------------------
# the "system" torch link farm


def _system_torch():
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


# ---------------------------------------------------------------------------------------------
# helpers


def _check_version(version: str) -> str:
    from packaging.version import InvalidVersion, Version

    try:
        parsed = Version(version)
    except InvalidVersion:
        parsed = None
    if parsed is None or str(parsed) != version.strip() or parsed.local:
        raise EnvironmentSetupError(f"{version!r} is not a transformers release version (expected e.g. 4.48.0)")
    return str(parsed)


def _python(path: Path) -> Path:
    return path / "Scripts" / "python.exe" if os.name == "nt" else path / "bin" / "python"


def _site_packages(path: Path) -> Path:
    if os.name == "nt":
        return path / "Lib" / "site-packages"
    return path / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def _write_pths(path: Path, torch_dir: Path | None, *, log: Log) -> None:
    """(Re)point the env at the current source tree and at the torch link dir (cheap; idempotent)."""
    site = _site_packages(path)
    wanted = {SRC_PTH: str(_source_dir(path.parent))}
    if torch_dir is not None:
        wanted[TORCH_PTH] = str(torch_dir)
    for file, line in wanted.items():
        pth = site / file
        old = pth.read_text().strip() if pth.exists() else None
        if old != line:
            if old is not None:
                log(f"env {path.name}: {file} now points at {line} (was {old})")
            pth.write_text(line + "\n")


def _source_dir(root: Path) -> Path:
    """A directory whose only package is opensci_patch: the checkout, or a one-link dir under `root`.

    A checkout (pyproject.toml next to the package) is used as is. An installed copy lives in some
    site-packages, which must not go on the env's path whole (it would leak every other package).
    """
    if (SRC_ROOT / "pyproject.toml").exists():
        return SRC_ROOT
    link_dir = root / f"_opensci_patch-src-{hashlib.sha256(str(SRC_ROOT).encode()).hexdigest()[:10]}"
    if not (link_dir / "opensci_patch").exists():
        link_dir.mkdir(parents=True, exist_ok=True)
        tmp = link_dir / f".opensci_patch-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.symlink_to(SRC_ROOT / "opensci_patch")
        os.replace(tmp, link_dir / "opensci_patch")  # atomic: concurrent callers never see it missing
    return link_dir


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _remove_ours(path: Path, root: Path, why: str, log: Log, *, sentinel: str = SENTINEL) -> None:
    """Remove a directory we made; refuse anything that is not plainly ours."""
    inside = path.parent.resolve() == root.resolve() and not path.is_symlink()
    ours = inside and path.is_dir() and (_looks_ours(path, sentinel) or not any(path.iterdir()))
    if not ours:
        raise EnvironmentSetupError(
            f"{path} exists but was not created by opensci-patch; move it away or choose another env root (${ROOT_VAR})"
        )
    log(f"removing {why} env dir {path}")
    _discard(path, root)


def _looks_ours(path: Path, sentinel: str) -> bool:
    """Our sentinel, or (an env whose removal an older version left half-done) our source `.pth` in it."""
    if (path / sentinel).exists():
        return True
    return sentinel == SENTINEL and (_site_packages(path) / SRC_PTH).is_file()


def _discard(path: Path, root: Path) -> None:
    """Remove a directory of ours: rename it aside first (atomic), then delete it, ignoring errors.

    An installer that outlived a killed driver may still write into it, so `rmtree` can fail with
    "Directory not empty"; renamed aside, that failure no longer matters (a later build sweeps the
    rest) and the env path is free at once.
    """
    trash = root / f".trash-{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        path.rename(trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _sweep_trash(root: Path) -> None:
    for trash in root.glob(".trash-*"):
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _death_signal_setter() -> Callable[[], None] | None:
    """Linux: a `preexec_fn` that makes the installer get SIGKILL when the driver dies.

    Without it, an installer outlives a killed driver and writes on into the env alone. The libc
    function is looked up here, in the parent: the forked child only calls it (no imports, no loading).
    """
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock; creation is still marker-guarded
        yield
        return
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tail(text: str, n: int = TAIL_LINES) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join("    " + line for line in lines[-n:])
