"""The GitHub workflows: their job matrix comes from the noxfile, and they name only real sessions.

The matrix script is fed what `nox --list --json` really prints for this checkout, so adding a
release to `opensci_patch/matrix/spec.py` is enough for the nightly workflow to run it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from opensci_patch.matrix.spec import REFERENCE, TRANSFORMERS_VERSIONS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".github" / "scripts" / "nox_matrix.py"
WORKFLOWS = {p.name: p for p in sorted((REPO / ".github" / "workflows").glob("*.yml"))}

pytest.importorskip("nox")


def nox_list(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nox", "--list", "--json", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def run_script(listing: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], input=listing, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def nox_matrix():
    spec = importlib.util.spec_from_file_location("nox_matrix", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def listing_cpu() -> str:
    """Exactly what the workflows run: `nox --list --json -t cpu`."""
    proc = nox_list("-t", "cpu")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def listing_cpu_and_cuda() -> str:
    proc = nox_list("-t", "cpu", "cuda")
    assert proc.returncode == 0, proc.stderr
    assert "torch='cuda'" in proc.stdout  # the noxfile declares cuda cells: the script must drop them
    return proc.stdout


@pytest.fixture(scope="module")
def workflows() -> dict[str, dict]:
    yaml = pytest.importorskip("yaml")
    return {name: yaml.safe_load(path.read_text()) for name, path in WORKFLOWS.items()}


@pytest.mark.parametrize("listing", ["listing_cpu", "listing_cpu_and_cuda"])
def test_matrix_is_the_cpu_cell_of_every_release_and_no_cuda(request, listing):
    proc = run_script(request.getfixturevalue(listing))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1  # one line: it goes into $GITHUB_OUTPUT
    entries = json.loads(proc.stdout)["include"]
    assert [e["transformers"] for e in entries] == TRANSFORMERS_VERSIONS
    assert [e["session"] for e in entries] == [f"cell(transformers='{v}', torch='cpu')" for v in TRANSFORMERS_VERSIONS]
    assert {e["torch"] for e in entries} == {"cpu"}
    assert not any("cuda" in e["session"] for e in entries)


def test_artifact_names_are_unique_and_safe(listing_cpu):
    entries = json.loads(run_script(listing_cpu).stdout)["include"]
    slugs = [e["slug"] for e in entries]
    assert len(set(slugs)) == len(slugs)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", s) for s in slugs)


@pytest.mark.parametrize(
    ("wanted", "expected"),
    [
        ("5.2.0 newest", {REFERENCE[0], "5.2.0", TRANSFORMERS_VERSIONS[-1]}),
        ("5.2.0", {REFERENCE[0], "5.2.0"}),
        ("oldest,newest", {TRANSFORMERS_VERSIONS[0], REFERENCE[0], TRANSFORMERS_VERSIONS[-1]}),
        ("", set(TRANSFORMERS_VERSIONS)),
        ("all", set(TRANSFORMERS_VERSIONS)),
    ],
)
def test_a_subset_always_keeps_the_reference_release(nox_matrix, listing_cpu, wanted, expected):
    entries = nox_matrix.select(nox_matrix.cell_entries(json.loads(listing_cpu)), wanted, REFERENCE[0])
    assert {e["transformers"] for e in entries} == expected


def test_sessions_format_is_one_session_a_line(listing_cpu):
    proc = run_script(listing_cpu, "--transformers", "4.48.0 5.2.0 newest", "--format", "sessions")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"cell(transformers='{v}', torch='cpu')" for v in ("4.48.0", "5.2.0", TRANSFORMERS_VERSIONS[-1])
    ]


@pytest.mark.parametrize(("listing", "args", "rc"), [("[]", (), 1), ("nox > error", (), 2), (None, ("9.9.9",), 2)])
def test_nothing_to_run_is_an_error(listing_cpu, listing, args, rc):
    proc = run_script(listing_cpu if listing is None else listing, *(("--transformers", *args) if args else ()))
    assert proc.returncode == rc
    assert proc.stdout == ""
    assert proc.stderr.startswith("nox_matrix: ")


def test_workflows_parse_with_least_privilege(workflows):
    assert set(workflows) >= {"ci.yml", "nightly.yml"}
    assert set(workflows["ci.yml"]["jobs"]) == {"tests", "crossversion", "lint", "small-matrix"}
    assert set(workflows["nightly.yml"]["jobs"]) == {"plan", "cell", "report", "torch-sweep"}
    for name, wf in workflows.items():
        assert wf["permissions"] == {"contents": "read"}, name
        for job_name, job in wf["jobs"].items():
            writes = {k for k, v in (job.get("permissions") or {}).items() if v == "write"}
            assert writes == ({"issues"} if (name, job_name) == ("nightly.yml", "report") else set())


def test_nightly_matrix_comes_from_the_nox_listing(workflows):
    nightly = workflows["nightly.yml"]["jobs"]
    plan = "\n".join(s.get("run", "") for s in nightly["plan"]["steps"])
    assert "nox --list --json -t cpu | python .github/scripts/nox_matrix.py" in plan
    assert nightly["cell"]["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
    assert nightly["cell"]["strategy"]["fail-fast"] is False


def test_workflows_name_existing_nox_sessions(workflows):
    named = set()
    for wf in workflows.values():
        for job in wf["jobs"].values():
            for step in job["steps"]:
                for m in re.finditer(r"\bnox\s+(?:[^\n|;]*?\s)?-s\s+(\S+)", step.get("run", "")):
                    if not m.group(1).startswith('"$'):  # "$SESSION", "${sessions[@]}": from the listing
                        named.add(m.group(1).strip("'\""))
    assert named >= {"tests", "crossversion", "lint", "report"}
    proc = nox_list("-s", *sorted(named))  # nox exits non-zero on an unknown session
    assert proc.returncode == 0, proc.stderr
    assert {s["session"] for s in json.loads(proc.stdout)} == named


def test_ci_runs_the_readmes_test_command_and_it_runs_every_test():
    """.ci/run runs the README's test command, which is the fast and the per-release sessions together."""
    readme = (REPO / "README.md").read_text()
    command = re.findall(r"```bash\n(.*?)\n```", readme, re.S)[1].strip()
    nox_part = command.rsplit("&& ", 1)[1]
    assert nox_part.split() == ["nox", "-s", "tests", "crossversion"]
    assert nox_part in (REPO / ".ci" / "run").read_text().splitlines()


@pytest.fixture
def noxfile_calls(monkeypatch):
    """The noxfile loaded as a module, its CLI calls recorded instead of run: [argv of each call]."""
    spec = importlib.util.spec_from_file_location("noxfile_under_test", REPO / "noxfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls: list[list[str]] = []
    monkeypatch.setattr(module, "cli", lambda session, *args: calls.append(list(args)))
    return module, calls


class _Session:
    posargs: list[str] = []

    def skip(self, why: str):
        raise pytest.skip.Exception(why)


@pytest.mark.parametrize("session", ["matrix", "cell"])
def test_the_cpu_sessions_run_eager_and_sdpa_float32_and_bfloat16(noxfile_calls, session):
    """Before: only the cuda cells ran sdpa and bfloat16; the CPU ones (nox -s matrix, the nightly) float32 eager."""
    module, calls = noxfile_calls
    if session == "matrix":
        module.run_matrix.func(_Session())
    else:
        module.cell.func(_Session(), transformers="5.2.0", torch="cpu")
    (argv,) = calls
    pairs = {(argv[i], argv[i + 1]) for i in range(len(argv) - 1)}
    assert {("--torch", "cpu"), ("--dtype", "float32"), ("--dtype", "bfloat16"), ("--attn", "eager"),
            ("--attn", "sdpa")} <= pairs  # fmt: skip


def test_the_nightly_torch_sweep_runs_cpu_wheels_of_the_reference_and_newest(workflows):
    """Issue 27: a nightly job sweeps torch for the reference and newest releases from PyTorch's CPU index."""
    nightly = workflows["nightly.yml"]
    run = "\n".join(s.get("run", "") for s in nightly["jobs"]["torch-sweep"]["steps"])
    assert "opensci-patch cell --torch-sweep" in run and "opensci-patch report" in run
    assert "--torch " not in run and "--transformers" not in run  # the sweep's own default: 4.48.0 and the newest
    assert nightly["env"]["OPENSCI_PATCH_TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"


def test_the_cell_sessions_run_the_driver_installed_in_their_own_venv():
    """The driver hotfixes in its own process, so its venv holds this package (libcst, ...) and a transformers for the
    relative_imports check: before, the cell sessions had no venv (venv_backend "none") and ran nox's interpreter."""
    spec = importlib.util.spec_from_file_location("noxfile_venvs", REPO / "noxfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.cell.venv_backend != "none" and module.run_matrix.venv_backend != "none"

    class Recording:
        def __init__(self):
            self.calls: list[tuple] = []

        def install(self, *args):
            self.calls.append(("install", *args))

        def run(self, *args, **kwargs):
            self.calls.append(("run", *args))

    session = Recording()
    module.cli(session, "cell", "--all")
    (install, run) = session.calls
    assert install[:3] == ("install", "-e", ".") and any(a.startswith("transformers==") for a in install)
    assert run == ("run", "opensci-patch", "cell", "--all")  # the venv's entry point, not nox's interpreter
