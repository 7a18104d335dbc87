"""Dependency overrides for releases whose pins the index cannot meet (as 5.25.0's kernels pin, until kernels 0.19.1).

The file format and per-range selection, how an env is built and keyed with overrides (uv `--override`, the pip
fallback), the one-line error for an unmet pin, and the overrides in the record and the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_envs import VERSION, fake_installer, fake_venv, needs_torch  # noqa: F401  (fixture)

from opensci_patch._util import fs, locations, procs
from opensci_patch._util.errors import EnvironmentSetupError
from opensci_patch.matrix import envs, overrides, spec, venv
from opensci_patch.measure import records
from opensci_patch.results import judge, render

REPO = Path(__file__).resolve().parents[1]

# uv 0.13.9's output for `uv pip install transformers==5.25.0` on an index with kernels 0.17.2 at most
UV_UNMET = """\
error: No solution found when resolving dependencies
  cause: Because only kernels<=0.17.2 is available and transformers>=5.25.0 depends on kernels>=0.19.1,<0.20, \
we can conclude that transformers>=5.25.0 cannot be used.
         And because you require transformers==5.25.0, we can conclude that your requirements are unsatisfiable.
"""
PIP_UNMET = """\
ERROR: Could not find a version that satisfies the requirement kernels<0.20,>=0.19.1 (from transformers) \
(from versions: 0.16.2, 0.17.0, 0.17.1, 0.17.2)
ERROR: No matching distribution found for kernels<0.20,>=0.19.1
"""
# some of transformers 5.25.0's Requires-Dist (its wheel's METADATA)
REQUIRES_525 = [
    "huggingface-hub<3.0,>=2.4.0",
    "numpy>=1.17",
    "kernels<0.20,>=0.19.1",
    'torch>=2.6; extra == "torch"',
    'kernels<0.20,>=0.19.1; extra == "torch"',
]


def test_the_committed_file_parses_and_lifts_no_pin_today():
    """Every pinned release installs with its own pins on today's index (5.25.0 with kernels 0.19.1)."""
    found = overrides.load(overrides.COMMITTED)
    for release in (*spec.TRANSFORMERS_VERSIONS, "5.25.3", "5.26.0"):
        assert overrides.for_release(found, release) == []


def test_ranges_comments_and_the_optional_word_transformers():
    text = "# comment\n\n>=5.25: kernels>=0.17  # why\ntransformers==5.25.0: kernels; sys_platform == 'never'\n"
    found = overrides.parse(text)
    assert overrides.for_release(found, "5.25.0") == ["kernels>=0.17", 'kernels; sys_platform == "never"']
    assert overrides.for_release(found, "5.24.0") == []


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("kernels>=0.17", "is not `RANGE: REQUIREMENT`"),
        ("5.25: kernels>=0.17", "is not a release range"),
        (": kernels>=0.17", "no release range"),
        (">=5.25: kernels>=>0.17", "is not a requirement"),
        (">=5.25: torch==2.0", "torch cannot be overridden"),
    ],
)
def test_a_bad_line_is_one_error_naming_file_and_line(line, why):
    with pytest.raises(overrides.OverridesError, match=rf"f\.txt, line 2: .*{why}"):
        overrides.parse(f"# first\n{line}\n", "f.txt")


def test_unmet_pin_is_read_from_uv_and_pip_output():
    assert envs.unmet_pin(UV_UNMET) == ("kernels", "kernels>=0.19.1,<0.20", "kernels<=0.17.2")
    assert envs.unmet_pin(PIP_UNMET) == ("kernels", "kernels<0.20,>=0.19.1", None)
    assert envs.unmet_pin("error: transformers==9.9.9 not found") is None


def test_pip_fallback_replaces_the_overridden_requirement_and_drops_extras():
    got = envs.rewrite_requirements(REQUIRES_525, ["kernels>=0.17"])
    assert got == ["huggingface-hub<3.0,>=2.4.0", "numpy>=1.17", "kernels>=0.17"]


@needs_torch
def test_an_unmet_pin_is_one_line_naming_package_pin_and_the_way_out(tmp_path, fake_installer, monkeypatch):  # noqa: F811
    def failing(cmd, cwd, name):
        if "venv" in cmd:
            return fake_installer_make(cmd, cwd, name)
        raise EnvironmentSetupError(f"env {name}: `uv pip install ...` failed (exit 1). Last output:\n{UV_UNMET}")

    fake_installer_make = procs.run_installer
    monkeypatch.setattr(procs, "run_installer", failing)
    with pytest.raises(EnvironmentSetupError) as caught:
        envs.ensure_env("5.25.0", "system", root=tmp_path, log=lambda m: None)
    first = str(caught.value).splitlines()[0]
    assert "transformers 5.25.0 requires kernels>=0.19.1,<0.20" in first
    assert "(it has kernels<=0.17.2)" in first and "--overrides FILE" in first
    assert records.one_line(str(caught.value)) == first  # what the cell's record and the report show
    assert not (tmp_path / envs.env_name("5.25.0", "system")).exists()  # nothing half-made left


@needs_torch
def test_an_env_is_keyed_on_its_overrides(tmp_path, fake_installer, monkeypatch):  # noqa: F811
    log = lambda m: None  # noqa: E731
    monkeypatch.delenv(overrides.VAR, raising=False)
    plain = envs.ensure_env(VERSION, "system", root=tmp_path, log=log)
    lifted = envs.ensure_env(VERSION, "system", root=tmp_path, log=log, overrides=["kernels>=0.17"])
    assert lifted.path != plain.path and not lifted.reused and lifted.overrides == ("kernels>=0.17",)
    install = next(cmd for cmd in fake_installer if f"transformers=={VERSION}" in cmd and "--override" in cmd)
    listing = Path(install[install.index("--override") + 1])
    assert listing.read_text() == "kernels>=0.17\n"
    assert json.loads((lifted.path / locations.MARKER).read_text())["overrides"] == ["kernels>=0.17"]
    # each is reused only for its own overrides
    assert envs.ensure_env(VERSION, "system", root=tmp_path, log=log).path == plain.path
    again = envs.ensure_env(VERSION, "system", root=tmp_path, log=log, overrides=["kernels>=0.17"])
    assert again.reused and again.path == lifted.path
    other = envs.ensure_env(VERSION, "system", root=tmp_path, log=log, overrides=["kernels>=0.16"])
    assert other.path not in (plain.path, lifted.path) and not other.reused
    # the variable names a file; the overrides that apply to the release are used
    (tmp_path / "o.txt").write_text(f"=={VERSION}: kernels>=0.17\n>=9: kernels>=0.1\n")
    monkeypatch.setenv(overrides.VAR, str(tmp_path / "o.txt"))
    assert envs.ensure_env(VERSION, "system", root=tmp_path, log=log).path == lifted.path


@needs_torch
def test_an_override_env_whose_marker_lacks_the_overrides_is_rebuilt(tmp_path, fake_installer):  # noqa: F811
    log = lambda m: None  # noqa: E731
    lifted = envs.ensure_env(VERSION, "system", root=tmp_path, log=log, overrides=["kernels>=0.17"])
    marker = json.loads((lifted.path / locations.MARKER).read_text())
    del marker["overrides"]
    (lifted.path / locations.MARKER).write_text(json.dumps(marker))
    assert envs.ensure_env(VERSION, "system", root=tmp_path, log=log, overrides=["kernels>=0.17"]).reused is False


@needs_torch
def test_without_uv_pip_installs_transformers_without_deps_then_the_rewritten_requirements(
    tmp_path,
    fake_installer,  # noqa: F811
    monkeypatch,
):
    monkeypatch.setattr(procs, "find_uv", lambda: None)
    made = []

    def make_venv(path, root, log):
        made.append(path)
        fake_venv(path)
        return ["pip", "install"]

    monkeypatch.setattr(venv, "make_venv", make_venv)
    monkeypatch.setattr(envs, "_pip_requirements", lambda path, ov: envs.rewrite_requirements(REQUIRES_525, ov))
    envs.ensure_env(VERSION, "system", root=tmp_path, log=lambda m: None, overrides=["kernels>=0.17"])
    installs = [cmd for cmd in fake_installer if cmd[:2] == ["pip", "install"]]
    assert installs[0] == ["pip", "install", "--no-deps", f"transformers=={VERSION}"]
    assert "kernels>=0.17" in installs[1] and not any(r.startswith("kernels<") for r in installs[1])


def test_cell_refuses_an_unreadable_overrides_file_with_exit_2(cli, tmp_path):
    proc = cli("cell", "--transformers", "5.25.0", "--overrides", str(tmp_path / "nope.txt"),
               "--records", str(tmp_path / "r"))  # fmt: skip
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot read the overrides file" in proc.stderr
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").iterdir())


def _record(version: str, model: str, ov: list[str]) -> records.Record:
    cell = records.CellInfo(version, "cpu", model, "float32", "eager", f"tf{version}-cpu-{model}-float32-eager", "cpu")
    gen = records.Generation((1,), "x", ("a",), records.KVCheck(True, 1e-3, 0.0, None, ""))
    return records.Record(
        environment={"transformers": version, "overrides": ov},
        status=records.Status.OK,
        logits_sha256="s",
        generation=gen,
        cell=cell,
        expected=records.Expected("pass", ""),
        topk=(records.TopToken(1, " Paris", 1.0),),
    )


def test_records_refuse_overrides_that_are_not_a_list_of_strings(tmp_path):
    path = tmp_path / "r.json"
    rec = _record("5.25.0", "patched", ["kernels>=0.17"])
    fs.write_atomic(path, rec)
    assert records.load(path).environment["overrides"] == ["kernels>=0.17"]
    rec.environment["overrides"] = "kernels>=0.17"
    fs.write_atomic(path, rec)
    with pytest.raises(records.RecordError, match="environment.overrides"):
        records.load(path)


def test_the_report_shows_the_overrides_next_to_the_cell():
    rows = judge.rows([_record("4.48.0", "patched", []), _record("5.25.0", "patched", ["kernels>=0.17"])])
    by_release = {r.transformers: r for r in rows}
    assert by_release["5.25.0"].overrides == ("kernels>=0.17",) and by_release["4.48.0"].overrides == ()
    table = render.markdown_table(rows)
    line = next(line for line in table.splitlines() if line.startswith("| 5.25.0"))
    assert "kernels>=0.17" in line
    grid = judge.grid(rows)
    cells = next(iter(grid.values()))
    md = render.markdown_grid(cells, set(), {"5.25.0": "kernels>=0.17"})
    assert "5.25.0 (override kernels>=0.17)" in md and "4.48.0 (override" not in md


def _tiny_wheel(where: Path) -> Path:
    """A one-module wheel, built here: what an overrides line may pin by URL and hash."""
    import base64
    import hashlib
    import zipfile

    files = {
        "tinypkg/__init__.py": b"X = 1\n",
        "tinypkg-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1\n",
        "tinypkg-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    digest = lambda data: base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()  # noqa: E731
    record = "".join(f"{k},sha256={digest(v)},{len(v)}\n" for k, v in files.items())
    record += "tinypkg-0.1.dist-info/RECORD,,\n"
    wheel = where / "tinypkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in {**files, "tinypkg-0.1.dist-info/RECORD": record.encode()}.items():
            z.writestr(name, data)
    return wheel


WRONG = "0" * 64


def test_a_hash_fragment_in_a_url_requirement_is_kept_and_only_a_spaced_hash_is_a_comment(tmp_path):
    url = f"file://{tmp_path}/tinypkg-0.1-py3-none-any.whl#sha256={WRONG}"
    found = overrides.parse(f">=4.48,<4.49: tinypkg @ {url}  # pinned by hash\n#>=4.48: x\n")
    (requirement,) = overrides.for_release(found, "4.48.0")
    assert requirement.endswith(f"#sha256={WRONG}") and "pinned" not in requirement


@needs_torch
def test_an_override_pinned_by_hash_reaches_the_installer_which_refuses_a_wrong_wheel(
    tmp_path,
    fake_installer,  # noqa: F811
):
    """The hash survives parse, env name and `--override` listing; uv then refuses the wheel (hash mismatch)."""
    wheel = _tiny_wheel(tmp_path)
    (tmp_path / "ov.txt").write_text(f"=={VERSION}: tinypkg @ {wheel.as_uri()}#sha256={WRONG}\n")
    pinned = overrides.for_release(overrides.load(tmp_path / "ov.txt"), VERSION)
    envs.ensure_env(VERSION, "system", root=tmp_path / "envs", log=lambda m: None, overrides=pinned)
    install = next(cmd for cmd in fake_installer if "--override" in cmd)
    listing = Path(install[install.index("--override") + 1])
    assert listing.read_text().strip().endswith(f"#sha256={WRONG}")
    uv = procs.find_uv()
    if uv is None:
        return  # the listing is checked above; uv's own refusal needs uv
    run = lambda *a: subprocess.run([uv, *a], capture_output=True, text=True, timeout=120)  # noqa: E731
    assert run("venv", "-q", "--offline", "--python", sys.executable, str(tmp_path / "v")).returncode == 0
    target = str(venv.venv_python(tmp_path / "v"))
    proc = run("pip", "install", "--offline", "--python", target, "--override", str(listing), "tinypkg")
    assert proc.returncode != 0 and "Hash mismatch" in proc.stderr
    assert not list(venv.site_packages(tmp_path / "v").glob("tinypkg*"))


def _load_in_child(path: Path) -> subprocess.CompletedProcess[str]:
    code = "import sys; from opensci_patch.matrix import overrides; overrides.load(sys.argv[1])"
    env = procs.child_env()
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("what", ["device", "fifo", "huge"])
def test_an_overrides_file_that_is_not_a_small_regular_file_is_refused_at_once(tmp_path, what):
    """/dev/zero read until memory ran out; a FIFO blocked for ever."""
    path = tmp_path / "ov.txt"
    if what == "device":
        path = Path("/dev/zero")
    elif what == "fifo":
        os.mkfifo(path)
    else:
        path.write_text("# a comment line\n" * 100_000)
    try:
        proc = _load_in_child(path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"overrides.load({path}) blocked")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("opensci_patch.matrix.overrides.OverridesError"), proc.stderr[-500:]
    assert ("larger than" if what == "huge" else "not a regular file") in last


# --- added requirements: cell --require PKG (issue 29) -----------------------------------------------------------


def test_added_requirements_are_checked_normalised_and_never_transformers_or_torch(monkeypatch):
    assert overrides.requirements(["einops", " einops ", "accelerate >= 0.20"]) == ["einops", "accelerate>=0.20"]
    for bad, why in (("torch", "cannot be added"), ("transformers==4.48.0", "cannot be added"), ("a b!", "not a req")):
        with pytest.raises(overrides.OverridesError, match=why):
            overrides.requirements([bad])
    monkeypatch.setenv(overrides.REQUIRE_VAR, "einops\n\naccelerate\n")
    assert overrides.requirements_from_env() == ["einops", "accelerate"]


@needs_torch
def test_an_env_is_keyed_on_its_added_requirements(tmp_path, fake_installer, monkeypatch):  # noqa: F811
    log = lambda m: None  # noqa: E731
    monkeypatch.delenv(overrides.VAR, raising=False)
    monkeypatch.delenv(overrides.REQUIRE_VAR, raising=False)
    plain = envs.ensure_env(VERSION, "system", root=tmp_path, log=log)
    added = envs.ensure_env(VERSION, "system", root=tmp_path, log=log, extra_requirements=["einops"])
    assert added.path != plain.path and added.path.name.startswith(plain.path.name + "-rq")
    assert added.extra_requirements == ("einops",) and not added.reused
    install = [cmd for cmd in fake_installer if f"transformers=={VERSION}" in cmd]
    assert "einops" in install[-1] and not any("einops" in cmd for cmd in install[:-1])
    assert json.loads((added.path / locations.MARKER).read_text())["extra_requirements"] == ["einops"]
    monkeypatch.setenv(overrides.REQUIRE_VAR, "einops")  # what `cell --require einops` sets for the run
    assert envs.ensure_env(VERSION, "system", root=tmp_path, log=log).path == added.path
    assert envs.ensure_env(VERSION, "system", root=tmp_path, log=log, extra_requirements=[]).path == plain.path


def test_cell_refuses_a_bad_added_requirement_with_exit_2(cli, tmp_path):
    proc = cli("cell", "--transformers", "4.48.0", "--require", "torch", "--records", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "torch cannot be added" in proc.stderr


def test_the_report_shows_added_requirements_like_overrides():
    rec = _record("4.48.0", "patched", [])
    rec.environment["extra_requirements"] = ["einops"]
    (row,) = judge.rows([rec])
    assert row.overrides == ("+einops",)
    line = next(line for line in render.markdown_table([row]).splitlines() if line.startswith("| 4.48.0"))
    assert "+einops" in line
