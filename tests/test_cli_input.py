"""Bad input gives one line on stderr and exit 2, never a bare traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FIXTURE_DIR


def _assert_one_line_error(proc, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("opensci-patch: error:")
    assert needle in lines[0]


def test_capture_missing_dir(cli, tmp_path: Path):
    _assert_one_line_error(cli("capture", str(tmp_path / "nope")), "no such directory")


def test_capture_file_instead_of_dir(cli, tmp_path: Path):
    f = tmp_path / "x.txt"
    f.write_text("hi")
    _assert_one_line_error(cli("capture", str(f)), "not a directory")


def test_capture_dir_without_config(cli, tmp_path: Path):
    _assert_one_line_error(cli("capture", str(tmp_path)), "no config.json")


@pytest.mark.parametrize("damage", ["truncate", "garbage-header"])
def test_capture_corrupt_safetensors(cli, model_dir: Path, damage: str):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64)
    _assert_one_line_error(cli("capture", str(model_dir)), "corrupt safetensors")


def test_capture_multi_token_target(cli, model_dir: Path):
    _assert_one_line_error(cli("capture", str(model_dir), "--target", " Paris is"), "not one")


def test_capture_refuses_to_overwrite_record(cli, model_dir: Path, tmp_path: Path):
    out = tmp_path / "record.json"
    out.write_text("precious")
    _assert_one_line_error(cli("capture", str(model_dir), "--out", str(out)), "--force")
    assert out.read_text() == "precious"


def test_fixture_refuses_non_empty_dir(cli, tmp_path: Path):
    (tmp_path / "keep.txt").write_text("mine")
    _assert_one_line_error(cli("fixture", str(tmp_path)), "not empty")
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_fixture_writes_a_loadable_checkpoint(cli, tmp_path: Path):
    proc = cli("fixture", str(tmp_path / "fx"))
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in (tmp_path / "fx").iterdir()}
    assert {
        "config.json",
        "modeling_opensci.py",
        "configuration_opensci.py",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names


def test_bisect_rejects_an_inverted_range(cli):
    _assert_one_line_error(
        cli("bisect", "--good", "5.2.0", "--bad", "4.57.6", "--versions", "4.57.6,5.2.0"), "must be older"
    )


def test_diagnose_rejects_a_malformed_cell_and_writes_nothing(cli, tmp_path: Path):
    out = tmp_path / "diag"
    _assert_one_line_error(cli("diagnose", "not-a-cell", "5.2.0:patched", "--out", str(out)), "not-a-cell")
    assert not out.exists()


def test_cell_runs_every_combination_of_the_dtype_attn_and_variant_options(monkeypatch, tmp_path: Path):
    from opensci_patch import cli as cli_module
    from opensci_patch.matrix import runner, spec

    ran, references = [], []
    def main_cells(cells, *args, **kwargs):
        references.append(kwargs["reference"])
        ran.extend(cells)
        return 0

    monkeypatch.setattr(runner, "main_cells", main_cells)
    args = ["cell", "--transformers", "4.48.0", "--torch", "cuda", "--variant", "patched", "--variant", "structural",
            "--attn", "eager", "--attn", "sdpa", "--dtype", "bfloat16", "--records", str(tmp_path)]  # fmt: skip
    assert cli_module.main([*args, "--reference", "off"]) == 0
    assert references == ["off"]  # passed through to every capture of the run (`CaptureStep.reference`)
    got = {(c.model, c.dtype, c.attn, c.device) for c in ran}
    assert got == {(m, "bfloat16", a, "cuda") for m in ("patched", "structural") for a in ("eager", "sdpa")}
    assert len(ran) == 4
    ran.clear()
    assert cli_module.main(["cell", "--transformers", "5.2.0", "--records", str(tmp_path)]) == 0
    assert {(c.dtype, c.attn, c.torch) for c in ran} == {("float32", "eager", "cpu")}
    assert {c.model for c in ran} == set(spec.VARIANTS)
    ran.clear()
    own = ["cell", "--transformers", "5.2.0", "--model", str(FIXTURE_DIR), "--records", str(tmp_path)]
    assert cli_module.main(own) == 0  # another checkpoint: every variant but the one with its own weights
    assert {c.model for c in ran} == {m for m, v in spec.VARIANTS.items() if not v.own_checkpoint}


def test_cell_refuses_the_generated_variant_on_another_checkpoint(cli, model_dir: Path, tmp_path: Path):
    proc = cli("cell", "--transformers", "5.2.0", "--variant", "generated", "--model", str(model_dir),
               "--records", str(tmp_path / "records"))  # fmt: skip
    _assert_one_line_error(proc, "drop --model")
    assert not (tmp_path / "records").exists()


def test_a_syntax_error_in_the_model_file_is_one_line(cli, model_dir: Path):
    with (model_dir / "modeling_opensci.py").open("a") as f:
        f.write("\ndef broken(:\n")
    proc = cli("hotfix", str(model_dir))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "syntax error at line" in lines[0] and "modeling_opensci.py" in lines[0]


def test_a_missing_tokenizer_is_one_line(cli, model_dir: Path):
    (model_dir / "tokenizer.json").unlink()
    (model_dir / "tokenizer_config.json").unlink()
    proc = cli("capture", str(model_dir))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot load the tokenizer" in lines[0]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--transformers", "abc"], "not a transformers release number"),
        (["--transformers", "5.2.0", "--transformers", "4.30.0"], "unsupported (< 4.48.0)"),
    ],
)
def test_cell_refuses_bad_releases_before_any_cell_runs(cli, tmp_path: Path, args, words):
    records = tmp_path / "records"
    proc = cli("cell", *args, "--records", str(records))
    assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not records.exists()  # nothing ran, nothing was written


def test_cell_refuses_a_records_path_that_is_a_file(cli, tmp_path: Path):
    target = tmp_path / "records"
    target.write_text("not a directory")
    proc = cli("cell", "--transformers", "5.2.0", "--records", str(target))
    assert proc.returncode == 2 and "is not a directory" in proc.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--prompt", ""], "prompt is empty"),
        (["--device", "bogus"], "not a device"),
        (["--max-new-tokens", "0"], "at least 1"),
        (["--max-new-tokens", "-2"], "at least 1"),
    ],
)
def test_capture_refuses_bad_settings_with_exit_2_and_no_record(cli, model_dir: Path, tmp_path: Path, args, words):
    out = tmp_path / "r.json"
    proc = cli("capture", str(model_dir), "--out", str(out), *args)
    assert proc.returncode == 2 and words in proc.stderr
    assert not out.exists()


def test_capture_refuses_an_out_path_that_is_a_directory_before_loading(cli, model_dir: Path, tmp_path: Path):
    proc = cli("capture", str(model_dir), "--out", str(tmp_path))
    assert proc.returncode == 2 and "is a directory" in proc.stderr


def test_capture_of_a_config_without_num_hidden_layers_is_no_traceback(cli, model_dir: Path, tmp_path: Path):
    config = json.loads((model_dir / "config.json").read_text())
    del config["num_hidden_layers"]
    (model_dir / "config.json").write_text(json.dumps(config))
    proc = cli("capture", str(model_dir), "--out", str(tmp_path / "r.json"), "--max-new-tokens", "1")
    assert "Traceback" not in proc.stderr and proc.returncode in (0, 1, 2), proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2


def _subparser(parser, name: str):
    import argparse

    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices[name]


def test_a_parser_built_for_one_subcommand_parses_and_helps_like_the_whole_one():
    from opensci_patch.cli import SUBCOMMANDS, build_parser

    whole = build_parser()
    for name, *_ in SUBCOMMANDS:
        lean = build_parser([name])
        assert _subparser(lean, name).format_help() == _subparser(whole, name).format_help(), name
        assert lean.format_help() == whole.format_help()
    for argv in (["hotfix", "src", "--out", "dst", "--with", "init_weights"], ["capture", "m", "--quiet"],
                 ["report", "--records", "r"], ["diagnose", "4.48.0:patched", "5.2.0:patched"]):  # fmt: skip
        assert vars(build_parser(argv).parse_args(argv)) == vars(whole.parse_args(argv)), argv


@pytest.mark.parametrize("argv, imports_diagnose", [(["hotfix", "src", "--out", "dst"], False), (None, True)])
def test_hotfix_does_not_set_up_diagnose_arguments(argv, imports_diagnose):
    """diagnose's arguments import its package: 0.1 s a hotfix does not need (the whole parser does import it)."""
    import subprocess
    import sys

    code = (
        f"import sys; from opensci_patch import cli; cli.build_parser({argv!r}); "
        "print('opensci_patch.diagnose' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == str(imports_diagnose)
