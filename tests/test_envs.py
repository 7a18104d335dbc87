"""Per-release environments: isolated, reused without installers, rebuilt when half-made."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from opensci_patch._util import fs, locations, procs
from opensci_patch._util.errors import EnvironmentSetupError
from opensci_patch.matrix import envs, torch_links, venv
from opensci_patch.matrix.envs import Env, ensure_env, installed_versions, run_python
from opensci_patch.matrix.torch_links import ensure_system_torch_dir

REPO = Path(__file__).resolve().parents[1]
VERSION = "4.48.0"

needs_torch = pytest.mark.skipif(
    not any(d.metadata["Name"] == "torch" for d in metadata.distributions()), reason="no torch in this interpreter"
)

# What the env sees, printed as JSON by a child process inside it.
INSIDE = """\
import importlib.util, json, sys
import torch, transformers, typing_extensions, opensci_patch
from transformers.utils import is_torch_available
print(json.dumps({
    "torch": torch.__file__, "transformers": transformers.__version__, "transformers_file": transformers.__file__,
    "torch_available": is_torch_available(), "opensci_patch": opensci_patch.__file__,
    "typing_extensions": typing_extensions.__file__, "pytest": importlib.util.find_spec("pytest") is not None,
    "libcst": importlib.util.find_spec("libcst") is not None,
    "sys_path": sys.path,
}))
"""


def _no_installer(*args, **kwargs):
    raise AssertionError(f"an installer/subprocess ran on a warm call: {args}")


@pytest.fixture(scope="module")
def env_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("envs")


@pytest.fixture(scope="module")
def env(env_root) -> Env:
    """One real env (transformers 4.48.0, system torch); ~10 s to create."""
    return ensure_env(VERSION, "system", root=env_root, log=lambda msg: None)


@pytest.fixture(scope="module")
def inside(env, env_root) -> dict:
    # cwd outside the repo: opensci_patch must come from the env's .pth, not from the current directory
    proc = run_python(env, ["-c", INSIDE], timeout=300, cwd=env_root)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@needs_torch
def test_torch_link_dir_holds_torch_and_its_requirement_closure_only(tmp_path):
    farm = ensure_system_torch_dir(tmp_path, log=lambda msg: None)
    names = {p.name for p in farm.iterdir()}
    torch_version = metadata.version("torch")
    assert {"torch", f"torch-{torch_version}.dist-info", "torchgen"} <= names
    # direct requirements, a single-module one, and requirements of requirements (sympy -> mpmath)
    closure = {"filelock", "sympy", "networkx", "jinja2", "fsspec", "typing_extensions.py", "mpmath", "markupsafe"}
    assert closure <= names
    assert not names & {"transformers", "pytest", "_pytest", "tokenizers", "huggingface_hub", "numpy", "libcst"}
    assert all(p.is_symlink() for p in farm.iterdir() if p.name not in ("__pycache__", torch_links.FARM_MANIFEST))
    assert ensure_system_torch_dir(tmp_path, log=lambda msg: None) == farm  # reused, same place


@pytest.mark.crossversion
def test_env_runs_its_own_transformers_with_the_system_torch(env, inside):
    assert env.reused is False
    assert inside["transformers"] == VERSION
    assert inside["transformers_file"].startswith(str(env.path))
    assert inside["torch_available"] is True
    assert Path(inside["torch"]).parent.parent.name.startswith("_torch-system-")
    assert installed_versions(env) == {
        "python": sys.version.split()[0],
        "torch": metadata.version("torch"),
        "transformers": VERSION,
        "torch_available": True,
        "unsupported_pair": None,  # the release supports this torch (measure.torch_support)
    }


@pytest.mark.crossversion
def test_env_imports_opensci_patch_from_the_source_tree(inside):
    assert Path(inside["opensci_patch"]) == REPO / "opensci_patch" / "__init__.py"
    assert inside["libcst"] is True  # its own dependencies too: hotfix runs inside cells


@pytest.mark.crossversion
def test_env_sees_nothing_of_the_base_but_torch(env, inside):
    assert inside["pytest"] is False
    # the env's own packages come before the linked torch requirements
    assert inside["typing_extensions"].startswith(str(env.path))
    site = next(i for i, p in enumerate(inside["sys_path"]) if p.startswith(str(env.path)))
    linked = next(i for i, p in enumerate(inside["sys_path"]) if "_torch-system-" in p)
    assert site < linked


@pytest.mark.crossversion
def test_run_python_drops_pythonpath_and_passes_env_vars(env, tmp_path, monkeypatch):
    (tmp_path / "transformers.py").write_text("__version__ = 'shadowed'\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    proc = run_python(
        env,
        ["-c", "import os, transformers; print(transformers.__version__, os.environ['MARK'])"],
        env_vars={"MARK": "passed"},
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [VERSION, "passed"]


@pytest.mark.crossversion
def test_second_call_reuses_the_env_without_any_installer(env, env_root, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _no_installer)
    monkeypatch.setattr(subprocess, "Popen", _no_installer)
    monkeypatch.setattr(procs, "run_installer", _no_installer)
    monkeypatch.setattr(envs, "installed_versions", _no_installer)
    marker = (env.path / locations.MARKER).read_bytes()
    messages: list[str] = []
    again = ensure_env(VERSION, "system", root=env_root, log=messages.append)
    assert again.reused is True
    assert (env.path / locations.MARKER).read_bytes() == marker  # nothing rebuilt, nothing rewritten
    assert (again.path, again.python) == (env.path, env.python)
    assert any(m.startswith("reusing env") for m in messages)


@pytest.mark.crossversion
def test_half_made_env_without_marker_is_rebuilt(tmp_path):
    half = tmp_path / envs.env_name(VERSION, "system")
    half.mkdir()
    (half / venv.SENTINEL).write_text("")
    (half / "pyvenv.cfg").write_text("home = /nowhere\n")
    (half / "leftover").write_text("from an interrupted install")
    messages: list[str] = []
    rebuilt = ensure_env(VERSION, "system", root=tmp_path, log=messages.append)
    assert rebuilt.reused is False
    assert not (half / "leftover").exists()
    marker = json.loads((half / locations.MARKER).read_text())
    assert (marker["transformers"], marker["torch_build"]) == (VERSION, "system")
    assert any("half-made" in m for m in messages)


@pytest.mark.crossversion
def test_concurrent_callers_build_the_env_once(tmp_path):
    code = (
        f"from pathlib import Path; from opensci_patch.matrix.envs import ensure_env; "
        f"print(ensure_env({VERSION!r}, 'system', root=Path({str(tmp_path)!r}), log=lambda m: None).reused)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    reused = sorted(p.communicate(timeout=600)[0].strip() for p in procs)
    assert [p.returncode for p in procs] == [0, 0]
    assert reused == ["False", "True"]


def test_directory_that_is_not_ours_is_never_deleted(tmp_path):
    foreign = tmp_path / envs.env_name(VERSION, "system")
    foreign.mkdir()
    (foreign / "precious.txt").write_text("user data")
    with pytest.raises(EnvironmentSetupError, match="not created by opensci-patch"):
        ensure_env(VERSION, "system", root=tmp_path, log=lambda msg: None)
    assert (foreign / "precious.txt").read_text() == "user data"


@pytest.mark.crossversion
def test_unknown_transformers_release_fails_with_installer_output_and_leaves_nothing(tmp_path):
    """A well-formed, supported release number the index does not have (a release < 4.48 is refused earlier)."""
    with pytest.raises(EnvironmentSetupError) as info:
        ensure_env("5.99.0", "system", root=tmp_path, log=lambda msg: None)
    message = str(info.value)
    assert "transformers==5.99.0" in message and "failed" in message
    assert len(message.splitlines()) > 1  # the installer's own explanation follows
    assert not (tmp_path / envs.env_name("5.99.0", "system")).exists()


@pytest.mark.parametrize("build", ["rocm", "CPU", ""])
def test_unknown_torch_build_is_rejected_before_anything_is_made(tmp_path, build):
    with pytest.raises(EnvironmentSetupError, match="cpu, system, cuda"):
        ensure_env(VERSION, build, root=tmp_path / "root", log=lambda msg: None)
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("version", [">=4.48", "4.48.0; rm -rf /", "latest", "4.48.0+local"])
def test_version_that_is_not_a_release_is_rejected(tmp_path, version):
    with pytest.raises(EnvironmentSetupError, match="not a transformers release version"):
        ensure_env(version, "system", root=tmp_path, log=lambda msg: None)


def test_cuda_build_without_an_index_or_a_gpu_torch_is_an_error_not_a_download(tmp_path, monkeypatch):
    monkeypatch.delenv(torch_links.TORCH_INDEX_VAR, raising=False)
    monkeypatch.setattr(torch_links, "_gpu_build", lambda dist: None)  # this interpreter's torch: a CPU build
    monkeypatch.setattr(procs, "run_installer", _no_installer)
    with pytest.raises(EnvironmentSetupError, match=torch_links.TORCH_INDEX_VAR) as info:
        ensure_env(VERSION, "cuda", root=tmp_path, log=lambda msg: None)
    assert "CUDA or ROCm build" in str(info.value)


class _FakeTorch:
    version = "2.11.0+cu130"

    def __init__(self, text):
        self.path = None
        self.text = text

    def locate_file(self, name):
        return self.path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("__version__ = '2.11.0+cu130'\ncuda: Optional[str] = '13.0'\nhip: Optional[str] = None\n", "cuda 13.0"),
        ("cuda = '12.8'\n", "cuda 12.8"),
        ("cuda: Optional[str] = None\nhip: Optional[str] = '6.4.43484'\n", "hip 6.4.43484"),
        ("__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\nhip: Optional[str] = None\n", None),
        ("git_version = 'cuda'\n", None),
    ],
)
def test_gpu_build_is_read_from_torch_version_py(tmp_path, text, expected):
    fake = _FakeTorch(text)
    fake.path = tmp_path / "version.py"
    fake.path.write_text(text)
    assert torch_links._gpu_build(fake) == expected
    fake.path = tmp_path / "missing.py"
    assert torch_links._gpu_build(fake) is None


@needs_torch
def test_this_interpreters_torch_is_classified_as_it_really_is():
    import torch

    gpu = torch_links._gpu_build(metadata.distribution("torch"))
    assert (gpu is not None) == bool(torch.version.cuda or getattr(torch.version, "hip", None))


@needs_torch
@pytest.mark.crossversion
def test_cuda_build_links_the_interpreters_gpu_torch_when_no_index_is_set(tmp_path, monkeypatch):
    """A GPU machine's own CUDA torch is reused (linked like "system"), never downloaded again."""
    monkeypatch.delenv(torch_links.TORCH_INDEX_VAR, raising=False)
    monkeypatch.setattr(torch_links, "_gpu_build", lambda dist: "cuda 13.0")  # pretend: this torch is a CUDA build
    installs = []
    real = procs.run_installer
    monkeypatch.setattr(procs, "run_installer", lambda cmd, *a: (installs.append(cmd), real(cmd, *a)))
    env = ensure_env(VERSION, "cuda", root=tmp_path, log=lambda msg: None)
    marker = json.loads((env.path / locations.MARKER).read_text())
    assert marker["torch"] == metadata.version("torch") and "torch_pin" not in marker
    assert marker["torch_dir"] and Path(marker["torch_dir"]).name.startswith("_torch-system-")
    assert not any(arg.startswith("torch==") for cmd in installs for arg in cmd)
    assert installed_versions(env)["torch"] == metadata.version("torch")


def test_wheel_dir_that_does_not_exist_is_an_error_before_anything_is_made(tmp_path, monkeypatch):
    monkeypatch.setenv(locations.WHEELS_VAR, str(tmp_path / "nowhere"))
    monkeypatch.setattr(procs, "run_installer", _no_installer)
    with pytest.raises(EnvironmentSetupError, match=locations.WHEELS_VAR):
        ensure_env(VERSION, "system", root=tmp_path / "root", log=lambda msg: None)
    assert not (tmp_path / "root" / envs.env_name(VERSION, "system")).exists()


@needs_torch
@pytest.mark.crossversion
def test_wheel_dir_is_the_only_source_offline_installs_use(tmp_path, monkeypatch):
    """OPENSCI_PATCH_WHEELS: installs never reach an index; with the wheels present they succeed."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv(locations.WHEELS_VAR, str(wheels))
    with pytest.raises(EnvironmentSetupError, match="transformers==4.48.0"):  # empty dir: the index is not asked
        ensure_env(VERSION, "system", root=tmp_path / "root", log=lambda msg: None)
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "-d", str(wheels),
         f"transformers=={VERSION}", *envs.package_requirements()],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert download.returncode == 0, download.stderr[-2000:]
    env = ensure_env(VERSION, "system", root=tmp_path / "root", log=lambda msg: None)
    assert installed_versions(env)["transformers"] == VERSION


def test_cpu_build_pins_a_cpu_torch_and_passes_pips_find_links_and_indexes(monkeypatch, tmp_path):
    """uv reads no pip configuration: pip's find-links and extra indexes are passed, with pip's best-match rule."""
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nfind-links = /c\nextra-index-url = file:///local/simple\n")
    monkeypatch.setattr(torch_links, "pip_config_files", lambda: [conf])
    monkeypatch.setenv("PIP_FIND_LINKS", f"{tmp_path}/a {tmp_path}/b")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv(torch_links.TORCH_INDEX_VAR, raising=False)
    args = torch_links.torch_install_args("cpu")
    assert args == [f"torch=={envs.TORCH_PIN}" + ("" if sys.platform == "darwin" else "+cpu"),
                    "--find-links", f"{tmp_path}/a", "--find-links", f"{tmp_path}/b", "--find-links", "/c",
                    "--index", "file:///local/simple", "--index-strategy", "unsafe-best-match"]  # fmt: skip
    assert torch_links.torch_install_args("cpu", uv=False)[-2:] == ["--extra-index-url", "file:///local/simple"]
    monkeypatch.setenv(torch_links.TORCH_INDEX_VAR, "https://download.pytorch.org/whl/cpu")
    assert torch_links.torch_install_args("cpu")[-4:-2] == ["--index", "https://download.pytorch.org/whl/cpu"]
    conf.write_text("[global]\n")
    monkeypatch.delenv("PIP_FIND_LINKS")
    assert torch_links.torch_install_args("2.6.0") == ["torch==2.6.0", "--index", "https://download.pytorch.org/whl/cpu"]


@pytest.mark.parametrize(
    ("inside", "linked", "same"),
    [
        ("2.11.0+cu130", "2.11.0", True),  # PyPI's CUDA wheel: no label in its metadata, one at run time
        ("2.13.0+cpu", "2.13.0+cpu", True),
        ("2.13.0+cpu", "2.13.0+cu130", False),
        ("2.12.0+cu130", "2.11.0", False),
        ("2.11.0", "2.11.0", True),
    ],
)
def test_linked_torch_version_check_accepts_a_runtime_label_the_metadata_lacks(inside, linked, same):
    assert torch_links.same_torch(inside, linked) is same


class _UnlabelledTorch:
    """This interpreter's torch distribution, reporting its version without the local label (as PyPI's CUDA wheels)."""

    def __init__(self, dist):
        self._dist = dist
        self.version = dist.version.split("+")[0]

    def __getattr__(self, name):
        return getattr(self._dist, name)


@needs_torch
@pytest.mark.crossversion
def test_env_linking_an_unlabelled_torch_is_reused_not_rebuilt(tmp_path, monkeypatch):
    """Distribution version 2.13.0, runtime 2.13.0+cu130: built once, then reused without any installer."""
    real = torch_links.system_torch()
    if "+" not in real.version:
        pytest.skip("this torch has no local label to drop")
    monkeypatch.setattr(torch_links, "system_torch", lambda: _UnlabelledTorch(real))
    first = ensure_env(VERSION, "system", root=tmp_path, log=lambda msg: None)
    assert not first.reused
    monkeypatch.setattr(procs, "run_installer", _no_installer)
    again = ensure_env(VERSION, "system", root=tmp_path, log=lambda msg: None)
    assert again.reused
    marker = json.loads((again.path / locations.MARKER).read_text())
    assert marker["torch"] == real.version.split("+")[0] and marker["torch_runtime"] == real.version


@needs_torch
@pytest.mark.crossversion
def test_without_uv_or_ensurepip_the_env_is_filled_by_this_interpreters_pip(tmp_path, monkeypatch):
    """GPU images and Debian Pythons without python3-venv cannot seed pip into a venv."""
    monkeypatch.setattr(procs, "find_uv", lambda: None)
    real = procs.run_installer
    ran = []

    def installer(cmd, cwd, name):
        ran.append(cmd)
        if cmd[1:3] == ["-m", "venv"] and "--without-pip" not in cmd:
            raise EnvironmentSetupError(f"env {name}: Error: ensurepip is not available (exit 1)")
        return real(cmd, cwd, name)

    monkeypatch.setattr(procs, "run_installer", installer)
    messages: list[str] = []
    env = ensure_env(VERSION, "system", root=tmp_path, log=messages.append)
    assert any("no ensurepip" in m for m in messages)
    assert any("--without-pip" in cmd for cmd in ran)
    assert any(cmd[:5] == [sys.executable, "-m", "pip", "--python", str(env.python)] for cmd in ran)
    assert installed_versions(env)["transformers"] == VERSION
    assert not (venv.site_packages(env.path) / "pip").exists()  # the env itself has no pip


# --- interrupted builds, two checkouts on one env root, child_env (issue 11) ------------------------------------


def fake_venv(path: Path) -> None:
    """A venv-shaped directory, made in milliseconds: site-packages and a python that is this interpreter."""
    venv.site_packages(path).mkdir(parents=True, exist_ok=True)
    venv.venv_python(path).parent.mkdir(parents=True, exist_ok=True)
    venv.venv_python(path).symlink_to(sys.executable)


@pytest.fixture
def fake_installer(monkeypatch) -> list[list[str]]:
    """Installers that make a venv-shaped directory in milliseconds; the env logic around them is the real one."""
    ran: list[list[str]] = []

    def run_installer(cmd, cwd, name):
        ran.append(cmd)
        if "venv" in cmd:
            fake_venv(Path(cmd[-1]))

    def versions(env):
        return {"python": sys.version.split()[0], "torch": metadata.version("torch"), "transformers": VERSION,
                "torch_available": True}  # fmt: skip

    monkeypatch.setattr(procs, "find_uv", lambda: "uv")
    monkeypatch.setattr(procs, "run_installer", run_installer)
    monkeypatch.setattr(envs, "installed_versions", versions)
    return ran


@needs_torch
def test_removal_that_an_orphaned_installer_makes_fail_leaves_the_env_usable(tmp_path, fake_installer, monkeypatch):
    """Driver killed mid-build, its installer writing on: rmtree failed with ENOTEMPTY, then the env was refused
    for good ("not created by opensci-patch": the sentinel was already deleted)."""
    half = tmp_path / envs.env_name(VERSION, "system")
    half.mkdir()
    (half / venv.SENTINEL).write_text("")
    (half / "written-by-the-orphan").write_text("")
    real_rmtree = shutil.rmtree

    def orphan_racing_rmtree(path, ignore_errors=False, onerror=None, **kwargs):
        (Path(path) / venv.SENTINEL).unlink(missing_ok=True)  # rmtree got this far...
        if not ignore_errors:  # ...then the orphan wrote another file
            raise OSError(errno.ENOTEMPTY, "Directory not empty", str(path))

    monkeypatch.setattr(fs.shutil, "rmtree", orphan_racing_rmtree)
    rebuilt = ensure_env(VERSION, "system", root=tmp_path, log=lambda msg: None)
    assert rebuilt.reused is False and (half / locations.MARKER).is_file()
    assert not (half / "written-by-the-orphan").exists()
    monkeypatch.setattr(fs.shutil, "rmtree", real_rmtree)
    assert ensure_env(VERSION, "system", root=tmp_path, log=lambda msg: None).reused is True
    fs.sweep_trash(tmp_path)
    assert not list(tmp_path.glob(".trash-*"))


@needs_torch
def test_env_left_without_its_sentinel_by_an_older_version_is_recognised_and_rebuilt(tmp_path, fake_installer):
    stuck = tmp_path / envs.env_name(VERSION, "system")
    venv.site_packages(stuck).mkdir(parents=True)
    (venv.site_packages(stuck) / venv.SRC_PTH).write_text(str(REPO) + "\n")
    (venv.site_packages(stuck) / "half-installed.py").write_text("")
    rebuilt = ensure_env(VERSION, "system", root=tmp_path, log=lambda msg: None)
    assert rebuilt.reused is False and (stuck / locations.MARKER).is_file()
    assert not (venv.site_packages(stuck) / "half-installed.py").exists()


def test_child_env_runs_the_callers_source_tree_and_drops_pythonhome(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    monkeypatch.setenv("PYTHONHOME", "/broken/home")
    env = procs.child_env({"MARK": "1"}, root=tmp_path)
    assert env["PYTHONPATH"] == str(REPO) and "PYTHONHOME" not in env and env["MARK"] == "1"
    assert "PYTHONPATH" not in procs.child_env(source=False)
    # an installed copy (no pyproject.toml next to it): a directory holding nothing but the package
    installed = tmp_path / "site-packages"
    (installed / "opensci_patch").mkdir(parents=True)
    monkeypatch.setattr(procs, "SRC_ROOT", installed)
    only = Path(procs.child_env(root=tmp_path / "root")["PYTHONPATH"])
    assert only.parent == tmp_path / "root" and [p.name for p in only.iterdir()] == ["opensci_patch"]
    assert (only / "opensci_patch").resolve() == installed / "opensci_patch"


@pytest.mark.crossversion
def test_two_checkouts_sharing_one_env_root_each_run_their_own_code(env, env_root, tmp_path, monkeypatch):
    """A cell from another checkout repoints the env's .pth; this checkout's children must still run this code."""
    other = tmp_path / "other-checkout"
    shutil.copytree(REPO / "opensci_patch", other / "opensci_patch", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", other)
    probe = ["-c", "import opensci_patch; print(opensci_patch.__file__)"]
    try:
        monkeypatch.setattr(procs, "SRC_ROOT", other)
        ensure_env(VERSION, "system", root=env_root, log=lambda msg: None)  # a cell started from the other checkout
        proc = run_python(env, probe, timeout=300, cwd=tmp_path)
        assert proc.stdout.strip() == str(other / "opensci_patch" / "__init__.py"), proc.stderr
        monkeypatch.setattr(procs, "SRC_ROOT", REPO)
        proc = run_python(env, probe, timeout=300, cwd=tmp_path)
        assert proc.stdout.strip() == str(REPO / "opensci_patch" / "__init__.py"), proc.stderr
    finally:
        monkeypatch.setattr(procs, "SRC_ROOT", REPO)
        ensure_env(VERSION, "system", root=env_root, log=lambda msg: None)  # point the .pth back for later tests


@pytest.mark.crossversion
def test_cpu_envs_link_one_shared_torch_layer_installed_once(tmp_path):
    """The "cpu" build installs and byte-compiles the pinned torch once; each release env only links it."""
    messages: list[str] = []
    env = ensure_env(VERSION, "cpu", root=tmp_path, log=messages.append)
    layers = sorted(p.name for p in tmp_path.glob("_torch-cpu-*") if p.is_dir())
    assert layers == [envs.torch_links.torch_layer_path("cpu", tmp_path).name]
    where = run_python(env, ["-c", "import torch; print(torch.__file__, torch.__version__)"]).stdout.split()
    assert where[0].startswith(str(tmp_path / "_torch-layer-")) and where[1].startswith(envs.TORCH_PIN)
    assert not list((env.path / "lib").glob("python*/site-packages/torch"))  # linked, not installed
    messages.clear()
    layer = torch_links.ensure_torch_layer("cpu", tmp_path, log=messages.append)
    assert layer.version.startswith(envs.TORCH_PIN) and not any("creating" in m for m in messages)


@needs_torch
def test_link_dir_build_sweeps_only_its_own_temp_dirs_of_dead_runs(tmp_path):
    farm = ensure_system_torch_dir(tmp_path, log=lambda msg: None)
    shutil.rmtree(farm)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    ours = tmp_path / f".{farm.name}.tmp-{dead}-0123abcd"
    ours.mkdir()
    (ours / torch_links.TMP_MARK).write_text("")
    unmarked = tmp_path / f".{farm.name}.tmp-{dead}-89abcdef"  # named like ours, but not marked: someone else's
    unmarked.mkdir()
    assert ensure_system_torch_dir(tmp_path, log=lambda msg: None) == farm and (farm / "torch").exists()
    assert not ours.exists() and unmarked.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [unmarked.name]


# --- a release not in its canonical form ----------------------------------------------------------------------------


def test_envs_refuse_a_release_not_in_its_canonical_form():
    from opensci_patch._util.errors import EnvironmentSetupError
    from opensci_patch.matrix import envs

    for spelling in ("4.48", " 4.48.0", "4.48.0+local"):
        with pytest.raises(EnvironmentSetupError):
            envs.check_version(spelling)
    assert envs.check_version("4.48.0") == "4.48.0"

