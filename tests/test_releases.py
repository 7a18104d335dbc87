"""Release resolution against a fake package index served on loopback, and the expectation rules."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from packaging.version import Version

from opensci_patch.matrix import releases, spec
from opensci_patch.matrix.spec import Cell, expectation

REPO = Path(__file__).resolve().parents[1]

# what a simple-API page of transformers lists (file names), with one yanked release
FILES = [
    ("transformers-4.47.1-py3-none-any.whl", False),
    ("transformers-4.48.0-py3-none-any.whl", False),
    ("transformers-4.48.3-py3-none-any.whl", False),
    ("transformers-4.48.3.tar.gz", False),
    ("transformers-4.49.0-py3-none-any.whl", False),
    ("transformers-5.3.0-py3-none-any.whl", False),
    ("transformers-5.3.1-py3-none-any.whl", True),  # yanked: never offered
    ("transformers-5.9.0-py3-none-any.whl", False),
    ("transformers-5.10.4-py3-none-any.whl", False),
    ("transformers-5.11.0rc1-py3-none-any.whl", False),
]
# another project's page (wheel names use `_` where the project name has `-`)
HUB_FILES = [("huggingface_hub-2.4.0-py3-none-any.whl", False), ("huggingface_hub-2.3.0.tar.gz", False)]


class _Index(http.server.BaseHTTPRequestHandler):
    mode = "json"

    def do_GET(self):  # noqa: N802 - http.server's naming
        files = {"/simple/transformers": FILES, "/simple/huggingface-hub": HUB_FILES}.get(self.path.rstrip("/"))
        if files is None:
            self.send_error(404)
            return
        if self.mode == "json":
            body = json.dumps({"files": [{"filename": f, "yanked": y} for f, y in files]}).encode()
            kind = "application/vnd.pypi.simple.v1+json"
        else:
            anchors = "".join(f'<a href="../../f/{f}"{" data-yanked=" if y else ""}>{f}</a><br/>' for f, y in files)
            body = f"<html><body>{anchors}</body></html>".encode()
            kind = "text/html"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(params=["json", "html"])
def fake_index(request, monkeypatch):
    handler = type("Handler", (_Index,), {"mode": request.param})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/simple"
    monkeypatch.setenv("OPENSCI_PATCH_INDEX_URL", url)
    yield url
    server.shutdown()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/simple"


def test_index_versions_skip_yanked_and_read_both_page_formats(fake_index):
    found = releases.index_versions()
    assert Version("5.3.1") not in found
    assert {Version("4.48.3"), Version("5.10.4"), Version("5.11.0rc1")} <= set(found)


def test_index_versions_of_another_project_match_its_normalised_file_names(fake_index):
    assert releases.index_versions(project="huggingface-hub") == [Version("2.3.0"), Version("2.4.0")]
    with pytest.raises(releases.IndexUnreachable):
        releases.index_versions(project="kernels")  # not on this index


def test_sweep_is_pinned_plus_latest_patch_of_every_minor_from_448(fake_index):
    got = releases.resolve(["4.48.0", "5.2.0"], sweep=True)
    # 4.47 is older than the oldest supported minor; 5.3.1 is yanked; 5.11.0rc1 is not final
    assert got == ["4.48.0", "4.48.3", "4.49.0", "5.2.0", "5.3.0", "5.9.0", "5.10.4"]


def test_pre_adds_the_newest_prerelease_only_when_newer_than_the_newest_final(fake_index):
    assert releases.resolve(["4.48.0"], pre=True, newest=False) == ["4.48.0", "5.11.0rc1"]
    assert releases.newest_pre([Version("5.2.0"), Version("5.2.0rc1")]) is None


def test_the_default_list_is_the_pinned_one_plus_the_newest_final_on_the_index(fake_index):
    assert releases.resolve(["4.48.0", "5.2.0"]) == ["4.48.0", "5.2.0", "5.10.4"]  # not 5.11.0rc1: a pre-release
    assert releases.resolve(["4.48.0", "5.2.0"], newest=False) == ["4.48.0", "5.2.0"]


def test_releases_command_and_noxfile_list_include_the_newest_final(fake_index, monkeypatch):
    proc = _cli("releases", env_extra={"OPENSCI_PATCH_INDEX_URL": fake_index})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == sorted({*spec.TRANSFORMERS_VERSIONS, "5.10.4"}, key=Version)
    monkeypatch.delenv("OPENSCI_PATCH_RELEASES", raising=False)
    assert "5.10.4" in spec.releases_from_env()


def test_releases_command_offline_prints_the_pinned_list_and_one_note():
    proc = _cli("releases", env_extra={"OPENSCI_PATCH_INDEX_URL": _closed_port_url()})
    assert proc.returncode == 0
    assert proc.stdout.split() == sorted(spec.TRANSFORMERS_VERSIONS, key=Version)
    assert len(proc.stderr.strip().splitlines()) == 1 and "newest release on the index" in proc.stderr


def test_newest_means_the_index_newest_final(fake_index):
    assert releases.newest_final(["4.48.0", "5.2.0"]) == "5.10.4"


def test_unreachable_index_falls_back_to_the_pinned_list_and_says_so(monkeypatch):
    monkeypatch.setenv("OPENSCI_PATCH_INDEX_URL", _closed_port_url())
    notes: list[str] = []
    assert releases.resolve(["5.2.0", "4.48.0"], sweep=True, pre=True, warn=notes.append) == ["4.48.0", "5.2.0"]
    assert len(notes) == 1 and "pinned list" in notes[0]
    assert releases.newest_final(["4.48.0", "5.2.0"], warn=notes.append) == "5.2.0"


def _cli(*args: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    from opensci_patch._util.procs import child_env

    env = child_env(env_extra)
    return subprocess.run(
        [sys.executable, "-m", "opensci_patch.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_releases_command_prints_one_release_a_line(fake_index):
    proc = _cli("releases", "--sweep", env_extra={"OPENSCI_PATCH_INDEX_URL": fake_index})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert set(spec.TRANSFORMERS_VERSIONS) <= set(lines) and "5.10.4" in lines
    assert lines == sorted(lines, key=Version)


def test_releases_command_offline_prints_the_pinned_list_with_a_note():
    proc = _cli("releases", "--sweep", env_extra={"OPENSCI_PATCH_INDEX_URL": _closed_port_url()})
    assert proc.returncode == 0
    assert proc.stdout.split() == sorted(spec.TRANSFORMERS_VERSIONS, key=Version)
    assert "cannot read" in proc.stderr and "pinned list" in proc.stderr


def test_noxfile_releases_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("OPENSCI_PATCH_RELEASES", "5.3.0, 4.48.0 5.3.0")
    assert spec.releases_from_env() == ["4.48.0", "5.3.0"]
    monkeypatch.setenv("OPENSCI_PATCH_RELEASES", "five")
    with pytest.raises(Exception, match="not a transformers release number"):
        spec.releases_from_env()
    monkeypatch.delenv("OPENSCI_PATCH_RELEASES")
    monkeypatch.setenv("OPENSCI_PATCH_INDEX_URL", _closed_port_url())  # offline: the pinned list
    assert spec.releases_from_env() == spec.TRANSFORMERS_VERSIONS


# --- expectation rules: a release nobody listed gets the right expectation ---------------------


@pytest.mark.parametrize("version", ["4.50.3", "4.53.3", "4.54.1", "5.2.0", "5.17.0", "5.24.0", "6.0.0rc1"])
def test_patched_is_expected_to_pass_on_unlisted_releases(version):
    for variant in ("patched", "patched+init", "generated"):
        assert expectation(Cell(version, model=variant)).outcome == "pass"


@pytest.mark.parametrize(("version", "missing"), [("4.53.3", "TransformersKwargs"), ("4.54.0", "LossKwargs")])
def test_original_fails_with_the_name_its_release_lacks(version, missing):
    exp = expectation(Cell(version, model="original"))
    assert exp.outcome == "xfail" and missing in exp.reason


@pytest.mark.parametrize(("version", "outcome"), [("4.57.6", "pass"), ("5.0.0", "xfail"), ("5.19.0", "xfail")])
def test_structural_fails_from_5_0_on(version, outcome):
    assert expectation(Cell(version, model="structural")).outcome == outcome


@pytest.mark.parametrize(("version", "outcome"), [("4.57.6", "pass"), ("5.0.0", "xfail"), ("5.1.0", "xfail"),
                                                  ("5.2.0", "pass")])  # fmt: skip
def test_init_weights_wipe_is_declared_for_5_0_and_5_1_only(version, outcome):
    assert expectation(Cell(version, model="patched")).outcome == outcome
    assert expectation(Cell(version, model="patched+init")).outcome == "pass"


@pytest.mark.parametrize(("version", "outcome"), [("4.48.0", "xfail"), ("4.50.3", "xfail"), ("4.51.0", "pass"),
                                                  ("5.0.0", "pass"), ("5.3.0", "pass")])  # fmt: skip
def test_qwen3_modular_is_expected_to_fail_only_where_transformers_lacks_qwen3(version, outcome):
    exp = expectation(Cell(version, model="qwen3-modular"))
    assert exp.outcome == outcome and (outcome == "pass" or "transformers.models.qwen3" in exp.reason)


@pytest.mark.parametrize(("version", "outcome"), [("4.48.0", "pass"), ("5.0.0", "xfail"), ("5.1.0", "xfail"),
                                                  ("5.2.0", "pass"), ("5.3.0", "pass")])  # fmt: skip
@pytest.mark.parametrize("variant", ["llama-research", "era43"])
def test_llama_research_declares_the_5_0_5_1_wipe_and_passes_on_5_3_with_remote_code(version, outcome, variant):
    assert expectation(Cell(version, model=variant)).outcome == outcome


# --- release strings in one canonical form; unknown releases are exit 2 before any work -----------------------------


@pytest.fixture
def index(monkeypatch):
    """The package index as `releases.index_versions` reads it: these releases, or unreachable (None)."""
    from packaging.version import Version

    from opensci_patch.matrix import releases

    listed: list = ["4.48.0", "4.57.6", "5.2.0", "5.2.0rc1", "5.3.0"]

    def fetch():
        if listed is None or not listed:
            raise releases.IndexUnreachable("cannot read https://pypi.org/simple/transformers/ (offline)")
        return [Version(v) for v in listed]

    monkeypatch.setattr(releases, "index_versions", fetch)
    return listed


def _cells_run(monkeypatch, argv: list[str]) -> tuple[int, list]:
    from opensci_patch import cli
    from opensci_patch.matrix import runner

    ran: list = []
    monkeypatch.setattr(runner, "main_cells", lambda cells, *a, **k: ran.extend(cells) or 0)
    return cli.main(argv), ran


def test_one_release_spelled_three_ways_is_one_canonical_release(monkeypatch, tmp_path: Path, index):
    argv = ["cell", "--variant", "patched", "--records", str(tmp_path / "r")]
    rc, ran = _cells_run(monkeypatch, [*argv, "--transformers", " 5.2.0", "--transformers", "5.2", "--transformers",
                                       "4.48", "--transformers", "4.48.0"])  # fmt: skip
    assert rc == 0 and sorted(c.transformers for c in ran) == ["4.48.0", "5.2.0"]
    assert all(" " not in c.id for c in ran)


def test_a_pre_release_is_refused_unless_asked_for(monkeypatch, tmp_path: Path, capsys, index):
    argv = ["cell", "--variant", "patched", "--records", str(tmp_path / "r"), "--transformers", "5.2.0rc1"]
    rc, ran = _cells_run(monkeypatch, argv)
    assert rc == 2 and ran == [] and "pre-release" in capsys.readouterr().err
    rc, ran = _cells_run(monkeypatch, [*argv, "--pre"])
    assert rc == 0 and "5.2.0rc1" in {c.transformers for c in ran}


@pytest.mark.parametrize("offline", [False, True])
def test_cell_with_a_release_that_does_not_exist_is_exit_2_before_any_work(monkeypatch, tmp_path, capsys, index,
                                                                           offline):  # fmt: skip
    if offline:
        index.clear()
    records = tmp_path / "records"
    rc, ran = _cells_run(monkeypatch, ["cell", "--transformers", "5.99.0", "--records", str(records)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and ran == [] and not records.exists() and len(err) == 1
    assert ("offline" if offline else "no such release") in err[0]


def test_cell_with_an_unknown_release_and_a_wheels_dir_is_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("OPENSCI_PATCH_WHEELS", str(tmp_path / "nonexistent"))
    monkeypatch.setenv("OPENSCI_PATCH_ENV_ROOT", str(tmp_path / "envs"))  # 5.3.0 is built in no env here
    rc, ran = _cells_run(monkeypatch, ["cell", "--transformers", "5.3.0", "--records", str(tmp_path / "r")])
    assert rc == 2 and ran == [] and "no such release in OPENSCI_PATCH_WHEELS" in capsys.readouterr().err


def test_bisect_and_diagnose_with_an_unknown_release_are_exit_2_before_any_work(monkeypatch, tmp_path, capsys,
                                                                                index):  # fmt: skip
    from opensci_patch import cli, diagnose
    from opensci_patch.matrix import envs
    from opensci_patch.results import bisect

    def no_work(*a, **k):
        raise AssertionError("did work")

    for mod, name in ((bisect, "run_cell"), (diagnose, "diagnose"), (envs, "ensure_env")):
        monkeypatch.setattr(mod, name, no_work)
    monkeypatch.setattr(bisect, "released_versions", lambda: ["4.48.0", "4.57.6", "5.2.0"])
    calls = [
        ["bisect", "--good", "4.57.6", "--bad", "5.99.0", "--versions", "4.57.6,5.99.0", "--work", str(tmp_path)],
        ["bisect", "--good", "4.57.6", "--bad", "5.99.0", "--work", str(tmp_path)],
        ["diagnose", "5.99.0:patched", "5.2.0:patched", "--out", str(tmp_path / "d")],
    ]
    for argv in calls:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "5.99.0" in err[0] and "no such" in err[0], (argv, err)

