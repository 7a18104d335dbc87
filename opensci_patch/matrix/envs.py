"""One isolated Python environment per (transformers release, torch build), created once and reused.

Every matrix cell, the cross-version tests and `bisect` run their code in such an environment, in
a child process (`run_python`), so that each cell sees exactly one transformers release and no
package of the interpreter running opensci_patch leaks in.

Torch builds (`TORCH_BUILDS`: "system", "cpu", "cuda"): torch is always pinned or linked, never resolved
freely, and every env links one torch through a shared link directory and a ``.pth``; how each build gets
its torch is `opensci_patch.matrix.torch_links`. A torch release as the spec (`2.13.0+cpu`, `2.6.0`) is
installed as named into a shared layer of its own, as the cpu build's pin is; naming one is the opt-in to its
download (the registry's default wheel on Linux is a CUDA build, ~2.9 GB with its nvidia-* wheels).
The low-level pieces both use (locks, the installer, removal of a
half-made directory, the child environment) are `opensci_patch.matrix.venv` and `opensci_patch._util`.

Offline machines (a GPU node without network, an air-gapped cluster): ``OPENSCI_PATCH_WHEELS=DIR``
makes every install ``--no-index --find-links DIR``, so transformers, its dependencies and
opensci_patch's own come from that directory of wheels only (``pip download`` them elsewhere for
the target's Python and platform; README, "Offline and GPU machines").

Layout: ``<root>/tf<release>-<torch spec>-py<X.Y>/`` with ``opensci-patch-env.json`` (the marker)
written last, after a successful install and a check that ``import torch`` and
``transformers.is_torch_available()`` work inside. The root is ``$OPENSCI_PATCH_ENV_ROOT``, else
``$XDG_CACHE_HOME/opensci-patch/envs`` (``~/.cache/opensci-patch/envs``). A directory without a
marker is a half-made env (Ctrl-C, a killed driver, a crash) and is removed and rebuilt, but only
when it is ours (``.opensci-patch-env`` written first, or our ``.pth``). Removal first renames the
directory aside (``.trash-<name>-<pid>-<hex>`` with a mark in it; later builds sweep only such marked
trash of dead pids, never another ``.trash-*``), so an installer that outlived
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

import datetime
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from opensci_patch._util import fs, locations, procs
from opensci_patch._util.defaults import TORCH_BUILDS, is_torch_release, torch_pin
from opensci_patch._util.defaults import TORCH_PIN as TORCH_PIN  # read by the tests as envs.TORCH_PIN
from opensci_patch._util.errors import EnvironmentSetupError
from opensci_patch._util.faults import fault_point
from opensci_patch._util.locations import MARKER
from opensci_patch._util.procs import SRC_ROOT
from opensci_patch.matrix import overrides as overrides_mod
from opensci_patch.matrix import torch_links, venv
from opensci_patch.matrix.torch_links import TORCH_INDEX_VAR
from opensci_patch.matrix.venv import SCHEMA, SRC_PTH, Log

TORCH_PTH = "_opensci_patch_torch.pth"

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
from opensci_patch.measure.torch_support import unsupported_pair
out["unsupported_pair"] = unsupported_pair()
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
    overrides: tuple[str, ...] = ()  # the dependency overrides it was built with (`opensci_patch.matrix.overrides`)
    extra_requirements: tuple[str, ...] = ()  # packages added to transformers' own (`cell --require`)


def env_name(
    transformers_version: str,
    torch_build: str,
    overrides: list[str] | tuple[str, ...] = (),
    extra: list[str] | tuple[str, ...] = (),
) -> str:
    """Directory name of an env, e.g. ``tf4.48.0-system-py3.11``; ``-ov<digest>`` when built with overrides,
    ``-rq<digest>`` with added requirements."""
    name = f"tf{transformers_version}-{torch_build}-py{sys.version_info[0]}.{sys.version_info[1]}"
    name = f"{name}-ov{overrides_mod.digest(list(overrides))}" if overrides else name
    return f"{name}-rq{overrides_mod.digest(list(extra))}" if extra else name


def ensure_env(
    transformers_version: str,
    torch_build: str,
    *,
    root: Path | None = None,
    log: Log = print,
    overrides: list[str] | None = None,
    extra_requirements: list[str] | None = None,
) -> Env:
    """Return the env for this release and torch build, creating it on first use.

    `overrides`: the dependency overrides for this release; None = those of `OPENSCI_PATCH_OVERRIDES`
    that apply to it. An env is reused only for the same overrides (its name and marker carry them).
    `extra_requirements`: packages installed besides transformers' own (None = `OPENSCI_PATCH_REQUIRE`'s),
    carried by the name and marker the same way.
    A warm call reads the marker and runs no installer (milliseconds). Raises
    `EnvironmentSetupError` when the env cannot be made; nothing half-made is left behind.
    """
    version = check_version(transformers_version)
    if overrides is None:
        overrides = overrides_mod.for_release(overrides_mod.from_env(), version)
    extra = overrides_mod.requirements_from_env() if extra_requirements is None else list(extra_requirements)
    if torch_build not in TORCH_BUILDS and not is_torch_release(torch_build):
        raise EnvironmentSetupError(f"unknown torch build {torch_build!r}: choose one of {', '.join(TORCH_BUILDS)} "
                                    "or a torch release (2.13.0+cpu, 2.6.0)")  # fmt: skip
    root = venv.check_settings(root)  # the env root and the variables that become paths or requirements
    name = env_name(version, torch_build, overrides, extra)
    path = root / name
    expected: dict[str, Any] = {
        "schema": SCHEMA,
        "name": name,
        "transformers_requested": version,
        "torch_build": torch_build,
        "requirements": package_requirements(),
    }
    if overrides:
        expected["overrides"] = list(overrides)
    if extra:
        expected["extra_requirements"] = extra
    # "torch": the linked torch's version; every env links one: the interpreter's ("system"), or the shared
    # layer of its build, where the pinned torch is installed and byte-compiled once ("torch_pin" set)
    if torch_links.links_system_torch(torch_build):
        expected["torch"] = torch_links.system_torch().version
        layer = None
    else:
        expected["torch_pin"] = torch_pin(torch_build)
        torch_links.torch_install_args(torch_build)  # fail early: e.g. a bad index
        layer = torch_links.ensure_torch_layer(torch_build, root, log=log)
        expected["torch"] = layer.version
        expected["torch_layer"] = True  # envs that installed torch themselves (before the layer) are rebuilt

    with fs.locked(root / f"{name}.lock"):
        marker = locations.read_marker(path)
        if (
            marker is not None
            and all(marker.get(k) == v for k, v in expected.items())
            and marker.get("overrides", []) == list(overrides)
            and marker.get("extra_requirements", []) == extra
            and venv.venv_python(path).exists()
        ):
            _write_pths(path, torch_links.torch_farm(root, layer, log), log=log)
            log(f"reusing env {name} ({path})")
            python = venv.venv_python(path)
            return Env(path, python, version, torch_build, True, tuple(overrides), tuple(extra))
        if path.exists() or path.is_symlink():
            why = "stale (built for something else)" if marker is not None else "half-made (no marker)"
            venv.remove_ours(path, root, why, log)
        _create(path, root, version, torch_build, expected, torch_links.torch_farm(root, layer, log), log)
        return Env(path, venv.venv_python(path), version, torch_build, False, tuple(overrides), tuple(extra))


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
        env=procs.child_env(env_vars, root=env.path.parent),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


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
        f"remove {env.path} and retry.\n{procs.tail(proc.stdout + proc.stderr, procs.TAIL_LINES, '    ')}"
    )


def _create(
    path: Path, root: Path, version: str, torch_build: str, expected: dict[str, Any], torch_dir: Path, log: Log
) -> None:
    uv = procs.find_uv()
    log(f"creating env {path.name} ({'uv' if uv else 'venv + pip'}) in {root} ...")
    start = time.monotonic()
    venv.claim_new_dir(path, root)
    try:
        fault_point("env.created")
        python = venv.venv_python(path)
        install = venv.new_venv(path, root, uv, log)
        _write_pths(path, torch_dir, log=log)
        _install(install, path, root, version, expected, uv is not None)
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
            "unsupported_pair": seen.get("unsupported_pair"),
            "python": seen["python"],
            "base_python": sys.executable,
            "installer": "uv" if uv else "pip",
            "torch_dir": str(torch_dir) if torch_dir else None,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - start, 1),
        }
        fault_point("env.marker")
        from opensci_patch._util.fs import write_atomic

        write_atomic(path / MARKER, marker)  # whole or absent, also across a power cut (fsync)
    except BaseException:
        fs.discard(path, root)
        raise
    log(
        f"created env {path.name} in {time.monotonic() - start:.1f} s "
        f"(transformers {seen['transformers']}, torch {seen['torch']})"
    )


def _install(install: list[str], path: Path, root: Path, version: str, expected: dict[str, Any], uv: bool) -> None:
    """transformers==version and our requirements, with the env's overrides (uv: `--override`; pip: see
    `opensci_patch.matrix.overrides`). An unmet pin is one line naming the package, the pin and the way out."""
    overrides = expected.get("overrides", [])
    ours = [*expected["requirements"], *expected.get("extra_requirements", [])]  # ours and `cell --require`'s
    try:
        if not overrides:
            procs.run_installer([*install, f"transformers=={version}", *ours], root, path.name)
        elif uv:
            listing = path / "opensci-patch-overrides.txt"
            listing.write_text("".join(f"{r}\n" for r in overrides))
            cmd = [*install, "--override", str(listing), f"transformers=={version}", *ours]
            procs.run_installer(cmd, root, path.name)
        else:
            procs.run_installer([*install, "--no-deps", f"transformers=={version}"], root, path.name)
            procs.run_installer([*install, *_pip_requirements(path, overrides), *ours], root, path.name)
    except EnvironmentSetupError as exc:
        pin = unmet_pin(str(exc))
        if pin is None:
            raise
        package, requirement, available = pin
        has = f" (it has {available})" if available else ""
        with_overrides = f" with overrides {', '.join(overrides)}" if overrides else ""
        raise EnvironmentSetupError(
            f"env {path.name}: transformers {version}{with_overrides} requires {requirement}, which the package "
            f"index cannot meet{has}; to test it anyway declare an override, e.g. the line "
            f"`transformers=={version}: {package}>=...` in a file passed as --overrides FILE or "
            f"{overrides_mod.VAR}=FILE (README, 'Releases whose pins the index cannot meet')\n{exc}"
        ) from None


# uv: "... and transformers==5.25.0 depends on kernels>=0.19.1,<0.20, we can conclude ..."
_UV_PIN = re.compile(
    r"transformers\S* depends on (?P<req>(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)[^\s,]*(?:,[<>=!~][^\s,]*)*)"
)
_UV_HAS = re.compile(r"only (?P<has>\S+) (?:is|are) available|there (?:is|are) no versions? of (?P<none>\S+)")
# pip: "Could not find a version that satisfies the requirement kernels<0.20,>=0.19.1 (from transformers==5.25.0)"
_PIP_PIN = re.compile(r"satisfies the requirement (?P<req>(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\S*) \(from transformers")


def unmet_pin(output: str) -> tuple[str, str, str | None] | None:
    """(package, requirement, what the index has) when an install failed on a pin of transformers', else None."""
    m = _UV_PIN.search(output) or _PIP_PIN.search(output)
    if m is None:
        return None
    has = _UV_HAS.search(output)
    available = None
    if has is not None:
        available = has["has"] or f"no {has['none']}"
    return m["name"], m["req"], available


_REQUIRES = "import importlib.metadata as m, json; print(json.dumps(m.requires('transformers') or []))"


def _pip_requirements(path: Path, overrides: list[str]) -> list[str]:
    """transformers' own requirements (no extras) as its installed metadata lists them, the overridden
    packages' replaced by the overrides: pip's nearest equivalent of uv's `--override`."""
    python = str(venv.venv_python(path))
    isolated = procs.child_env(source=False)
    proc = subprocess.run([python, "-c", _REQUIRES], capture_output=True, text=True, env=isolated)
    if proc.returncode != 0:
        why = procs.tail(proc.stderr, 1)
        raise EnvironmentSetupError(f"env {path.name}: cannot read transformers' requirements: {why}")
    return rewrite_requirements(json.loads(proc.stdout), overrides)


def rewrite_requirements(requires: list[str], overrides: list[str]) -> list[str]:
    """`requires` (a distribution's Requires-Dist) without extras and without the overridden packages, then the
    overrides."""
    from packaging.requirements import Requirement

    names = {Requirement(r).name.lower() for r in overrides}
    kept = []
    for line in requires:
        req = Requirement(line)
        if req.name.lower() in names or (req.marker is not None and "extra" in str(req.marker)):
            continue
        kept.append(line)
    return [*kept, *overrides]


def _check_installed(env: Env, seen: dict[str, Any], expected: dict[str, Any]) -> None:
    from packaging.version import Version

    problems = []
    if Version(seen["transformers"]) != Version(env.transformers_version):
        problems.append(f"transformers {seen['transformers']} installed, {env.transformers_version} asked for")
    if not seen["torch_available"] and not seen.get("unsupported_pair"):  # an unsupported pair is a fact: its
        problems.append("transformers.is_torch_available() is False")  # captures record it (`torch_support`)
    torch_local = Version(seen["torch"]).local or ""
    pinned = "torch_pin" in expected  # linked from the build's shared layer, which installed the pin
    if not torch_links.same_torch(seen["torch"], expected["torch"]):
        problems.append(f"torch {seen['torch']} seen inside, {expected['torch']} linked")
    elif pinned and Version(seen["torch"]).public != Version(expected["torch_pin"]).public:
        problems.append(f"torch {seen['torch']} installed, {expected['torch_pin']} pinned")
    elif pinned and env.torch_build == "cuda" and not torch_local.startswith(("cu", "rocm")):
        problems.append(f"torch {seen['torch']} installed, a CUDA build asked for (check {TORCH_INDEX_VAR})")
    if problems:
        raise EnvironmentSetupError(f"env {env.path.name} is not what was asked for: {'; '.join(problems)}")


def package_requirements() -> list[str]:
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


def check_version(version: str) -> str:
    """A release in its one canonical form (`releases.canonical`); any other spelling would be a second env."""
    from opensci_patch._util.errors import OpensciPatchError
    from opensci_patch.matrix import releases

    try:
        canonical = releases.canonical(version, pre=True)
    except OpensciPatchError as exc:
        raise EnvironmentSetupError(f"{version!r} is not a transformers release version ({exc})") from None
    if canonical != version:
        raise EnvironmentSetupError(f"{version!r} is not a transformers release version in its canonical form "
                                    f"({canonical!r})")  # fmt: skip
    return canonical


def _write_pths(path: Path, torch_dir: Path | None, *, log: Log) -> None:
    """(Re)point the env at the current source tree and at the torch link dir (cheap; idempotent)."""
    site = venv.site_packages(path)
    wanted = {SRC_PTH: str(procs.source_dir(path.parent))}
    if torch_dir is not None:
        wanted[TORCH_PTH] = str(torch_dir)
    for file, line in wanted.items():
        pth = site / file
        old = pth.read_text().strip() if pth.exists() else None
        if old != line:
            if old is not None:
                log(f"env {path.name}: {file} now points at {line} (was {old})")
            pth.write_text(line + "\n")


# a private name the tests still use
_site_packages = venv.site_packages
