"""The fault probe of issue 20: each case that broke a promise, as a test that fails on the code before the fix."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest


def _one_line_exit_2(proc, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("opensci-patch: error:") and needle in lines[0], proc.stderr


# --- (1) destroys: --out that exists and is not a regular file ------------------------------------------------


def test_capture_never_replaces_a_device_or_pipe_given_as_out_even_with_force(cli, model_dir: Path, tmp_path: Path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    proc = cli("capture", str(model_dir), "--out", str(fifo), "--force", "--max-new-tokens", "1")
    _one_line_exit_2(proc, "not a regular file")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)  # still the pipe, not a JSON file


def test_write_atomic_refuses_to_replace_a_non_regular_file(tmp_path: Path):
    from opensci_patch._util.errors import DestinationError
    from opensci_patch._util.fs import write_atomic

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(DestinationError, match="not a regular file"):
        write_atomic(fifo, {"a": 1})
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]  # no temp file left


# --- (2) destroys: two interpreters sharing one env root; cell exit status when cells crashed -----------------


@pytest.fixture
def fake_layer_installer(monkeypatch) -> list[str]:
    """Installers that make a torch layer in milliseconds: a venv layout and a torch .dist-info in it."""
    import sys

    from opensci_patch._util import procs
    from opensci_patch.matrix import torch_links, venv

    real_python, built = sys.executable, []

    def run_installer(cmd, cwd, name):
        if "venv" in cmd:
            path = Path(cmd[-1])
            venv.site_packages(path).mkdir(parents=True, exist_ok=True)
            venv.venv_python(path).parent.mkdir(parents=True, exist_ok=True)
            venv.venv_python(path).symlink_to(real_python)
            built.append(path.name)
            return
        site = venv.site_packages(Path(cmd[cmd.index("--python") + 1]).parents[1])
        info = site / f"torch-{torch_links.TORCH_PIN}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_links.TORCH_PIN}\n")
        (site / "torch").mkdir()
        (site / "torch" / "__init__.py").write_text("")

    monkeypatch.setattr(procs, "find_uv", lambda: "uv")
    monkeypatch.setattr(procs, "run_installer", run_installer)
    return built


def _as_interpreter(monkeypatch, executable: str, base: str) -> None:
    import sys

    monkeypatch.setattr(sys, "executable", executable)
    monkeypatch.setattr(sys, "_base_executable", base, raising=False)


def test_a_second_interpreter_never_deletes_the_torch_layer_the_first_one_uses(tmp_path, monkeypatch,
                                                                              fake_layer_installer):  # fmt: skip
    from opensci_patch.matrix import torch_links, venv

    root = tmp_path / "envs"
    _as_interpreter(monkeypatch, "/venvs/a/bin/python", "/pythons/one/bin/python3")
    torch_links.ensure_torch_layer("cpu", root, log=lambda m: None)
    (first,) = [p for p in root.glob("_torch-cpu-*") if p.is_dir()]
    in_use = venv.site_packages(first) / "torch" / "__init__.py"  # what the first run's cells import

    _as_interpreter(monkeypatch, "/venvs/b/bin/python", "/pythons/one/bin/python3")  # another venv, same base
    torch_links.ensure_torch_layer("cpu", root, log=lambda m: None)
    assert in_use.exists() and fake_layer_installer == [first.name]  # shared, not rebuilt

    _as_interpreter(monkeypatch, "/venvs/c/bin/python", "/pythons/two/bin/python3")  # another base interpreter
    torch_links.ensure_torch_layer("cpu", root, log=lambda m: None)
    assert in_use.exists()  # its own layer; the first one untouched
    assert len(fake_layer_installer) == 2 and len({*fake_layer_installer}) == 2


def test_a_complete_torch_layer_is_never_deleted_even_when_its_marker_differs(tmp_path, monkeypatch,
                                                                             fake_layer_installer):  # fmt: skip
    import json

    from opensci_patch._util import locations
    from opensci_patch._util.errors import EnvironmentSetupError
    from opensci_patch.matrix import torch_links, venv

    root = tmp_path / "envs"
    torch_links.ensure_torch_layer("cpu", root, log=lambda m: None)
    layer = torch_links.torch_layer_path("cpu", root)
    marker = json.loads((layer / locations.MARKER).read_text())
    (layer / locations.MARKER).write_text(json.dumps({**marker, "torch_pin": "0.0.1"}))
    with pytest.raises(EnvironmentSetupError, match="never deleted"):
        torch_links.ensure_torch_layer("cpu", root, log=lambda m: None)
    assert (venv.site_packages(layer) / "torch" / "__init__.py").exists()


def test_cell_exits_non_zero_when_its_cells_could_not_run(cli, tmp_path: Path):
    """OPENSCI_PATCH_WHEELS naming an empty directory: every cell is an env-error, and the command said exit 0.

    (A name that is no directory is refused up front now: exit 2, tests/test_env_settings.py.)"""
    import subprocess
    import sys

    from opensci_patch._util.procs import child_env

    records, wheels = tmp_path / "records", tmp_path / "no-wheels"
    wheels.mkdir()
    env = child_env({"OPENSCI_PATCH_WHEELS": str(wheels), "OPENSCI_PATCH_ENV_ROOT": str(tmp_path / "e")})
    proc = subprocess.run(
        [sys.executable, "-m", "opensci_patch.cli", "cell", "--transformers", "4.48.0", "--variant", "patched",
         "--records", str(records)],
        text=True, capture_output=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "could not run" in proc.stderr.strip().splitlines()[-1]


# --- (3) silently wrong: tensors missing from (or unused in) the checkpoint ------------------------------------


def _hotfixed_with_layers(cli, model_dir: Path, tmp_path: Path, layers: int) -> Path:
    import json

    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    out = tmp_path / f"fixed{layers}"
    assert cli("hotfix", str(model_dir), "--out", str(out)).returncode == 0
    return out


@pytest.mark.parametrize(("layers", "reference", "words"), [
    (4, "off", "18 tensor(s) the model needs are not in the checkpoint"),  # was: status ok, 18 tensors random
    (4, "auto", "18 tensor(s) the model needs are not in the checkpoint"),  # was: a bare traceback
    (2, "off", "18 checkpoint tensor(s) the model does not use"),
])  # fmt: skip
def test_a_checkpoint_whose_tensors_do_not_match_its_config_is_never_ok(cli, model_dir, tmp_path, layers, reference,
                                                                        words):  # fmt: skip
    from opensci_patch.measure import records

    fixed = _hotfixed_with_layers(cli, model_dir, tmp_path, layers)
    out = tmp_path / "r.json"
    proc = cli("capture", str(fixed), "--reference", reference, "--max-new-tokens", "1", "--out", str(out))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    record = records.load(out)
    assert record.status == "weights-mismatch" and words in record.error.message


# --- (4) silently wrong: report trusted logits_sha256 over the values it shows; no reference cell ---------------


def _report_verdicts(recs) -> dict:
    from opensci_patch.results import judge

    return {r.cell: (r.status, r.why, r.bit_identical) for r in judge.rows(recs)}


@pytest.mark.parametrize("edit", ["target", "topk", "greedy", "fp64"])
def test_a_record_whose_shown_values_differ_from_the_reference_never_passes_on_its_hash(edit: str):
    import test_report as tr

    from opensci_patch.measure import records

    ref, rec = tr.ok(tr.REF_VERSION), tr.ok("5.2.0")  # the same logits_sha256
    ref.reference = rec.reference = records.Fp64Reference("float64", 3.4e-6, 14.5)
    if edit == "target":
        rec.target = replace(rec.target, logit=99.0)
    elif edit == "topk":
        rec.topk = tuple(replace(t, logit=t.logit + 5.0) for t in rec.topk)
    elif edit == "greedy":
        rec.generation = replace(rec.generation, text=" Berlin.")
    else:
        rec.reference = replace(rec.reference, max_abs_diff=1e-12)
    status, why, bit_identical = _report_verdicts([ref, rec])[tr.vid("5.2.0")]
    assert status == "FAIL" and "contradicts itself" in why and bit_identical is False
    assert _report_verdicts([ref, tr.ok("5.2.0")])[tr.vid("5.2.0")][0] == "pass"  # unedited: still a pass


def test_no_reference_cell_is_cannot_judge_not_fail_and_still_exits_non_zero(tmp_path: Path):
    import test_report as tr

    bad, md, summary = tr.run_report(tmp_path, [tr.ok("5.2.0")])
    assert summary["verdicts"][tr.vid("5.2.0")] == "cannot-judge" and bad == 1
    assert "FAIL" not in summary["counts"]


# --- (5) silently wrong: a record that ran another release than its cell ---------------------------------------


def test_a_record_whose_environment_disagrees_with_its_cell_is_an_error_not_the_cell(tmp_path: Path):
    import test_report as tr

    other = tr.ok("5.2.0")
    other.environment["transformers"] = "4.57.6"
    bad, md, summary = tr.run_report(tmp_path, [tr.ok(tr.REF_VERSION), other])
    assert summary["verdicts"][tr.vid("5.2.0")] == "error" and bad == 1
    assert any("ran transformers '4.57.6'" in p for p in summary["problems"])


# --- (6) silently wrong: release strings in one canonical form; (8) unknown releases are exit 2 first -----------


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


def test_envs_refuse_a_release_not_in_its_canonical_form():
    from opensci_patch._util.errors import EnvironmentSetupError
    from opensci_patch.matrix import envs

    for spelling in ("4.48", " 4.48.0", "4.48.0+local"):
        with pytest.raises(EnvironmentSetupError):
            envs.check_version(spelling)
    assert envs.check_version("4.48.0") == "4.48.0"


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


# --- leftovers: SIGTERM is handled as Ctrl-C -------------------------------------------------------------------


def _terminate_when(cmd: list[str], tmpdir: Path, ready, timeout: float = 300):
    """Start the CLI with a private TMPDIR, SIGTERM it once `ready()` holds, and return the finished process."""
    import signal
    import subprocess
    import sys
    import time

    from opensci_patch._util.procs import child_env

    tmpdir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "opensci_patch.cli", *cmd], env=child_env({"TMPDIR": str(tmpdir)}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be terminated"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_a_terminated_capture_leaves_no_modules_cache(model_dir: Path, tmp_path: Path):
    tmpdir = tmp_path / "tmp"
    rc, err = _terminate_when(["capture", str(model_dir), "--max-new-tokens", "20"], tmpdir,
                              lambda: any(tmpdir.glob("opensci-hf-modules-*/*")))  # fmt: skip
    assert rc == 143 and "terminated" in err, err
    assert list(tmpdir.iterdir()) == []


def test_a_terminated_cell_run_leaves_no_run_dir_or_modules_cache(tmp_path: Path):
    from opensci_patch.measure import records

    tmpdir, recs = tmp_path / "tmp", tmp_path / "records"
    cmd = ["cell", "--transformers", "4.48.0", "--torch", "system", "--variant", "patched", "--variant", "structural",
           "--records", str(recs)]  # fmt: skip
    rc, err = _terminate_when(cmd, tmpdir, lambda: any(tmpdir.glob("opensci-run-*/**/opensci-hf-modules-*")))
    assert rc == 143, err
    assert list(tmpdir.iterdir()) == []
    # never a result: the capture process stopped too, it did not go on to the next cell (and no placeholder either:
    # a cell it did not finish has no record)
    assert {records.load(p).status for p in recs.glob("*.json")} <= {"crash"}


def test_a_terminated_hotfix_leaves_nothing_behind(tmp_path: Path):
    import subprocess
    import sys

    from opensci_patch._util import faults
    from opensci_patch._util.defaults import FIXTURE_DIR
    from opensci_patch._util.procs import child_env

    dst = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "opensci_patch.cli", "hotfix", str(FIXTURE_DIR), "--out", str(dst)],
                          env=child_env({faults.FAULT_VAR: "hotfix.copied:SIGTERM"}), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 143, proc.stderr
    assert list(tmp_path.iterdir()) == []  # no .out.partial-*, no .out.lock


# --- bad input: one line, exit 2, before any work ---------------------------------------------------------------


def _edit_config(model_dir: Path, **changes) -> None:
    import json

    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(("value", "words"), [(1e23, "not a positive integer"), (10**9, "of memory available"),
                                               (0, "not a positive integer")])  # fmt: skip
def test_impossible_sizes_are_refused_before_the_model_is_built(cli, model_dir: Path, tmp_path: Path, value, words):
    _edit_config(model_dir, num_hidden_layers=value)
    out = tmp_path / "r.json"
    _one_line_exit_2(cli("capture", str(model_dir), "--out", str(out), timeout=120), words)
    assert not out.exists()


def test_a_prompt_longer_than_the_models_positions_is_refused(cli, model_dir: Path):
    _one_line_exit_2(cli("capture", str(model_dir), "--prompt", "word " * 20000), "max_position_embeddings (512)")


def _rewrite_header(path: Path, edit) -> None:
    import json
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n :])


def _first(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


@pytest.mark.parametrize("damage", ["overlap", "dtype", "shape"])
def test_malformed_safetensors_offsets_dtypes_and_shapes_are_bad_input(cli, model_dir: Path, damage: str):
    def edit(header: dict) -> None:
        entry = _first(header)
        if damage == "overlap":  # a tensor whose bytes run into the next one's
            entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][1] + 4]
        elif damage == "dtype":
            entry["dtype"] = "Q9"
        else:
            entry["shape"] = [*entry["shape"], 2]

    _rewrite_header(model_dir / "model.safetensors", edit)
    _one_line_exit_2(cli("capture", str(model_dir)), "corrupt safetensors")


def test_a_shape_mismatch_names_the_tensors_instead_of_an_unshown_report(cli, model_dir, tmp_path):
    from opensci_patch.measure import records

    assert cli("hotfix", str(model_dir), "--out", str(tmp_path / "fixed")).returncode == 0
    _edit_config(tmp_path / "fixed", intermediate_size=128)
    out = tmp_path / "r.json"
    proc = cli("capture", str(tmp_path / "fixed"), "--out", str(out), "--max-new-tokens", "1")
    assert proc.returncode == 1 and "above report" not in proc.stderr
    record = records.load(out)
    assert record.status == "weights-mismatch"
    assert "(256, 96) in the checkpoint, (128, 96) in the model" in record.error.message


def test_a_missing_tokenizer_json_is_blamed_on_the_tokenizer_not_on_target(cli, model_dir: Path):
    (model_dir / "tokenizer.json").unlink()  # tokenizer_config.json alone loads a tokenizer with no vocabulary
    proc = cli("capture", str(model_dir))
    _one_line_exit_2(proc, "tokenizer.json is missing")
    assert "--target" not in proc.stderr


def test_auto_map_naming_a_missing_file_is_bad_input(cli, model_dir: Path, tmp_path: Path):
    (model_dir / "configuration_opensci.py").unlink()
    out = tmp_path / "r.json"
    _one_line_exit_2(cli("capture", str(model_dir), "--out", str(out)), "configuration_opensci.py")
    assert not out.exists()


def test_an_unterminated_triple_quote_is_reported_at_pythons_line(cli, model_dir: Path):
    modeling = model_dir / "modeling_opensci.py"
    lines = modeling.read_text().splitlines(keepends=True)
    at = len(lines) // 2
    modeling.write_text("".join(lines[:at]) + 'X = """never closed\n' + "".join(lines[at:]))
    with pytest.raises(SyntaxError) as python:
        compile(modeling.read_text(), str(modeling), "exec")
    proc = cli("hotfix", str(model_dir))
    _one_line_exit_2(proc, f"syntax error at line {python.value.lineno},")


def test_hotfix_refuses_a_config_json_that_is_not_an_object(cli, model_dir: Path):
    (model_dir / "config.json").write_text("[1, 2]")
    _one_line_exit_2(cli("hotfix", str(model_dir)), "not a config object")
    assert not (model_dir.parent / f"{model_dir.name}_fixed").exists()
