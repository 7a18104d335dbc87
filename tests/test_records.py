"""The record module: round trip, atomic writes, and `load` refusing every file it cannot vouch for."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import running_placeholder

from opensci_patch._util import fs
from opensci_patch._util.errors import DestinationError, OpensciPatchError
from opensci_patch.matrix.spec import Cell
from opensci_patch.measure import records
from opensci_patch.measure.records import Generation, KVCheck, Record, RecordError, Target, TopToken


def ok_record(**over) -> Record:
    rec = Record(
        settings={"dtype": "float32", "attn": "eager", "device": "cpu"},
        environment={"transformers": "5.2.0", "torch": "2.13.0+cpu"},
        model={"patched": True},
        input_ids=[1, 2, 3],
        target=Target(" Paris", 5, 14.5, 1),
        topk=(TopToken(5, " Paris", 14.5),),
        logits_sha256="a" * 64,
        generation=Generation((5, 6), " Paris.", ("a" * 64, "b" * 64), KVCheck(True, 1e-4, 0.0, None, "")),
    )
    for k, v in over.items():
        setattr(rec, k, v)
    return rec


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_round_trip_keeps_every_field(tmp_path: Path):
    cell = Cell("5.2.0")
    rec = ok_record(cell=records.CellInfo.of(cell), expected=records.Expected("pass", ""), cell_wall_s=4.2)
    path = fs.write_atomic(tmp_path / "r.json", rec)
    back = records.load(path)
    assert back == rec
    assert back.cell_id == cell.id


def test_capture_record_leaves_out_the_matrix_fields_and_loads():
    data = json.loads(ok_record().to_json())
    assert not set(records.CELL_FIELDS) & set(data)
    assert data["schema_version"] == records.SCHEMA_VERSION == 2


def test_error_record_has_the_shape_of_a_capture_record_and_loads(tmp_path: Path):
    cell = Cell("5.0.0", model="original")
    rec = records.error_record(cell, "env-error", "EnvironmentSetupError", "uv failed\nmore detail", "log tail")
    assert rec.error == records.ErrorInfo("EnvironmentSetupError", "uv failed", "log tail")
    assert rec.cell.id == cell.id and rec.cell.device == "cpu"
    assert rec.model == {"patched": False}
    assert set(json.loads(rec.to_json())) <= {f for f in Record.__dataclass_fields__}
    assert records.load(fs.write_atomic(tmp_path / "e.json", rec)) == rec
    with pytest.raises(ValueError, match="not an error status"):
        records.error_record(cell, "ok", "X", "m", "")


def test_running_placeholder_is_a_loadable_record_that_says_never_finished(tmp_path: Path):
    rec = running_placeholder(Cell("5.2.0"), expected=records.Expected("pass", ""))
    back = records.load(fs.write_atomic(tmp_path / "p.json", rec))
    assert back.status == records.RUNNING
    assert "never finished" in back.error.message


def test_write_atomic_replaces_whole_file_and_leaves_no_temp(tmp_path: Path):
    path = tmp_path / "x.json"
    fs.write_atomic(path, {"b": 1, "a": [1]})
    assert json.loads(path.read_text()) == {"a": [1], "b": 1}
    fs.write_atomic(path, "text\n")
    assert path.read_text() == "text\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path: Path, monkeypatch):
    path = fs.write_atomic(tmp_path / "x.json", "old\n")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fs.os, "fsync", boom)
    with pytest.raises(DestinationError, match="No space left"):
        fs.write_atomic(path, "new\n")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


@pytest.mark.parametrize("where", ["is_dir", "under_a_file"])
def test_write_atomic_into_an_unwritable_place_is_one_line(tmp_path: Path, where: str):
    (tmp_path / "f").write_text("")
    target = tmp_path if where == "is_dir" else tmp_path / "f" / "x.json"
    with pytest.raises(DestinationError) as info:
        fs.write_atomic(target, "x")
    assert isinstance(info.value, OpensciPatchError) and "\n" not in str(info.value)


def test_concurrent_writers_use_distinct_temp_files(tmp_path: Path):
    """Two processes writing one path: the result is one of the two whole texts, never a mix."""
    path = tmp_path / "x.json"
    code = (
        "import sys; from opensci_patch._util.fs import write_atomic\n"
        "for _ in range(200): write_atomic(sys.argv[1], sys.argv[2] * 5000)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), ch]) for ch in "ab"]
    assert [p.wait() for p in procs] == [0, 0]
    assert path.read_text() in ("a" * 5000, "b" * 5000)
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


BAD_FILES = {
    "empty": ("", "empty file"),
    "truncated": (None, "truncated JSON"),
    "truncated_in_a_string": ('{"schema_version": 2, "status": "o', "truncated JSON"),
    "garbage": ("{not json", "invalid JSON"),
    "list": ("[1, 2]", "not a record object"),
    "no_schema": ({"status": "ok"}, "no schema_version"),
    "old_schema": ({"schema_version": 1, "status": "ok"}, "schema_version 1"),
    "future_schema": ({"schema_version": 3}, "schema_version 3"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_load_refuses_with_one_line_naming_the_file(tmp_path: Path, name: str):
    content, message = BAD_FILES[name]
    if content is None:
        content = ok_record().to_json()[:-40]
    path = write(tmp_path / f"{name}.json", content)
    with pytest.raises(RecordError, match=message) as info:
        records.load(path)
    text = str(info.value)
    assert str(path) in text and "\n" not in text
    assert isinstance(info.value, OpensciPatchError)


def test_load_refuses_missing_unknown_and_mistyped_fields(tmp_path: Path):
    good = json.loads(ok_record().to_json())
    cases = {
        r"missing field\(s\) topk": {k: v for k, v in good.items() if k != "topk"},
        r"unknown field\(s\) surprise": good | {"surprise": 1},
        "field 'settings' is list": good | {"settings": []},
        "unknown status 'fine'": good | {"status": "fine"},
        "without logits_sha256": good | {"logits_sha256": None},
        "generation lacks kv_check": good | {"generation": {"ids": [], "text": "", "step_logits_sha256": []}},
        "contradicts generation.kv_check.ok": good | {"status": "generate-mismatch"},
        "cell lacks": good | {"cell": {"id": "x"}},
        "without an error description": good | {"status": "load-error"},
        "status 'ok' without a generation": good | {"generation": None},
        r"field 'cell_wall_s' is str, not float \| None": good | {"cell_wall_s": "4.2"},
        "environment.overrides is not a list of requirement strings": good | {"environment": {"overrides": "x"}},
        "kv_check lacks ok, tolerance": good | {"generation": {**good["generation"], "kv_check": {}}},
    }
    for message, data in cases.items():
        with pytest.raises(RecordError, match=message):
            records.load(write(tmp_path / "r.json", data))
        with pytest.raises(ValueError, match=message):  # one reader: the same rule refuses it without a file
            Record.from_dict(data)


def test_load_of_a_missing_file_is_a_record_error(tmp_path: Path):
    with pytest.raises(RecordError, match="cannot read"):
        records.load(tmp_path / "nope.json")


def test_records_module_imports_only_the_standard_library():
    """The noxfile and the driver import it with no torch, tabulate or packaging installed."""
    tree = ast.parse(Path(records.__file__).read_text())
    imported = {
        (node.module or "").split(".")[0] if isinstance(node, ast.ImportFrom) and node.level == 0 else None
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    } | {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported.discard(None)
    assert imported - {"opensci_patch"} <= set(sys.stdlib_module_names)  # its own modules: the child below
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import sys, opensci_patch.measure.records; print(sorted({'torch', 'tabulate'} & set(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=Path(records.__file__).parents[1]
    )
    assert proc.stdout.strip() == "[]", proc.stderr


def test_the_shipped_record_reads_and_writes_back_byte_for_byte():
    """The typed parts change nothing on disk: load -> to_json is the file, load -> to_dict is its JSON."""
    from opensci_patch._util.defaults import DATA_DIR

    path = DATA_DIR / "opensci-tiny.reference.json"
    rec = records.load(path)
    assert rec.to_json() == path.read_text(encoding="utf-8")
    assert rec.to_dict() == json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(rec.status, records.Status) and isinstance(rec.generation.kv_check, records.KVCheck)
    assert all(isinstance(t, records.TopToken) for t in rec.topk) and isinstance(rec.reference, records.Fp64Reference)


def test_statuses_are_the_strings_on_disk_and_say_which_are_no_evidence():
    assert [str(s) for s in records.STATUSES] == [s.value for s in records.Status]
    assert json.loads(json.dumps({"s": records.Status.GENERATE_MISMATCH})) == {"s": "generate-mismatch"}
    no_evidence = {"env-error", "crash", "hotfix-error", "running"}  # the cell could not run, or never finished
    assert {s for s in records.Status if s.no_evidence} == no_evidence
    model_failures = {"load-error", "weights-mismatch", "forward-error", "generate-error", "generate-mismatch"}
    assert not any(records.Status(s).no_evidence for s in {"ok", "nonfinite-logits", *model_failures})


def test_record_parts_are_frozen():
    import dataclasses

    rec = ok_record()
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.target.logit = 0.0  # type: ignore[misc]
    assert isinstance(rec.generation.ids, tuple)


@pytest.mark.parametrize(
    ("part", "edit"),
    [
        ("target", lambda d: d["target"].pop("rank")),
        ("topk", lambda d: d["topk"][0].update(surprise=1)),
        ("reference", lambda d: d.update(reference={"dtype": "float64"})),
        ("error", lambda d: d.update(status="load-error", error={"message": "m"})),
    ],
)
def test_load_refuses_a_part_with_missing_or_unknown_keys_in_one_line(tmp_path: Path, part, edit):
    """Schema 2 records were accepted with a target lacking "rank" (the report then raised a KeyError)."""
    data = json.loads(ok_record(reference=records.Fp64Reference("float64", 1e-6, 14.5)).to_json())
    edit(data)
    path = write(tmp_path / "r.json", data)
    with pytest.raises(RecordError) as info:
        records.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
