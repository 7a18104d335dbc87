"""hotfix and hotfix --check on hostile model dirs: one line and exit 2, the same refusals in both, nothing written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import FIXTURE_DIR, one_line_exit_2

from opensci_patch._util.errors import ModelDirError
from opensci_patch.rewrite.hotfix import hotfix


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """The shipped checkpoint's code and config with a small stand-in weights file."""
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    for name in ("config.json", "configuration_opensci.py", "modeling_opensci.py"):
        shutil.copy(FIXTURE_DIR / name, model)
    (model / "model.safetensors").write_bytes(os.urandom(50_000))
    return model


def _append(path: Path, text: str) -> int:
    """Append `text` on a new line of `path`; returns the line number it starts at."""
    before = path.read_text()
    path.write_text(before + "\n" + text)
    return before.count("\n") + 2


# --- a file libcst cannot handle ----------------------------------------------------------------------------------


@pytest.mark.parametrize("check", [False, True], ids=["run", "check"])
def test_an_expression_too_deep_for_libcst_is_one_line_naming_file_and_line(src: Path, cli, check: bool):
    modeling = src / "modeling_opensci.py"
    line = _append(modeling, "_BIG = " + "+".join(["1"] * 600) + "\n")
    compile(modeling.read_text(), str(modeling), "exec")  # Python itself takes it
    proc = cli("hotfix", str(src), *(["--check"] if check else []))
    one_line_exit_2(proc, "modeling_opensci.py", f"line {line}")
    assert sorted(p.name for p in src.parent.iterdir()) == ["m"]  # no output, no partial dir, no lock


def test_a_nesting_pythons_parser_refuses_is_one_line_and_never_reaches_libcst(src: Path, cli):
    """libcst's native parser crashes the process (SIGSEGV) on some nestings Python refuses, e.g. 5,000 parens."""
    modeling = src / "modeling_opensci.py"
    line = _append(modeling, "_DEEP = " + "(" * 5000 + "1" + ")" * 5000 + "\n")
    one_line_exit_2(cli("hotfix", str(src), "--check"), "modeling_opensci.py", f"syntax error at line {line},")


def test_deeply_nested_elifs_are_refused_by_the_api_with_a_model_dir_error(src: Path):
    modeling = src / "modeling_opensci.py"
    chain = "if _X:\n    pass\n" + "".join(f"elif _X == {i}:\n    pass\n" for i in range(1500))
    _append(modeling, chain)
    with pytest.raises(ModelDirError, match=r"modeling_opensci\.py: line \d+: .*nested too deeply"):
        hotfix(src, check=True, log=lambda _: None)


# --- links that lead back above SRC or to the output ---------------------------------------------------------------


def _watch_writes(monkeypatch) -> list[str]:
    """The names of the files the copy writes (each one hashed as it is copied)."""
    from opensci_patch.rewrite import hashed_copy

    written: list[str] = []
    real = hashed_copy._copy_hashing
    monkeypatch.setattr(hashed_copy, "_copy_hashing", lambda s, t: written.append(str(t)) or real(s, t))
    return written


def test_a_link_to_the_parent_is_a_loop_found_before_anything_is_copied(src: Path, monkeypatch):
    """`up -> ..` with the default DST (a sibling of SRC): the walk used to copy its own partial output into itself."""
    (src / "up").symlink_to("..")
    written = _watch_writes(monkeypatch)
    with pytest.raises(ModelDirError, match=r"/m/up: symbolic link loop") as err:
        hotfix(src, log=lambda _: None)
    assert len(str(err.value)) < 300
    assert written == [] and sorted(p.name for p in src.parent.iterdir()) == ["m"]


def test_a_link_to_the_folder_that_holds_the_output_is_refused_before_anything_is_copied(
    src: Path, tmp_path: Path, monkeypatch
):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (src / "results").symlink_to(outputs)
    written = _watch_writes(monkeypatch)
    with pytest.raises(ModelDirError, match=r"/m/results: .*holds the output"):
        hotfix(src, outputs / "fixed", log=lambda _: None)
    assert written == [] and list(outputs.iterdir()) == []


def test_a_link_into_the_output_is_refused(src: Path, tmp_path: Path):
    old = hotfix(src, tmp_path / "fixed", log=lambda _: None).dst
    (src / "previous").symlink_to(old)
    with pytest.raises(ModelDirError, match=r"/m/previous: .*holds the output"):
        hotfix(src, old, force=True, log=lambda _: None)


# --- --check runs the input checks of the real run ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "broken-link", "parent-link"])
def test_check_refuses_what_the_real_run_refuses(src: Path, cli, kind: str):
    bad = src / "sub" / "odd"
    bad.parent.mkdir()
    {
        "fifo": os.mkfifo,
        "broken-link": lambda p: p.symlink_to(src / "gone"),
        "parent-link": lambda p: p.symlink_to("../.."),
    }[kind](bad)
    check = cli("hotfix", str(src), "--check", timeout=60)
    run = cli("hotfix", str(src), timeout=60)
    assert one_line_exit_2(check, str(bad)) == one_line_exit_2(run, str(bad))
    assert sorted(p.name for p in src.parent.iterdir()) == ["m"]


def test_check_refuses_an_output_inside_the_source_like_the_real_run(src: Path, cli):
    check = cli("hotfix", str(src), "--check", "--out", str(src / "fixed"))
    run = cli("hotfix", str(src), "--out", str(src / "fixed"))
    assert one_line_exit_2(check, "inside it") == one_line_exit_2(run, "inside it")


# --- model code that does not parse; a config.json that is not an object --------------------------------------------


def test_an_unterminated_triple_quote_is_reported_at_pythons_line(cli, model_dir: Path):
    modeling = model_dir / "modeling_opensci.py"
    lines = modeling.read_text().splitlines(keepends=True)
    at = len(lines) // 2
    modeling.write_text("".join(lines[:at]) + 'X = """never closed\n' + "".join(lines[at:]))
    with pytest.raises(SyntaxError) as python:
        compile(modeling.read_text(), str(modeling), "exec")
    proc = cli("hotfix", str(model_dir))
    one_line_exit_2(proc, f"syntax error at line {python.value.lineno},")


def test_hotfix_refuses_a_config_json_that_is_not_an_object(cli, model_dir: Path):
    (model_dir / "config.json").write_text("[1, 2]")
    one_line_exit_2(cli("hotfix", str(model_dir)), "not a config object")
    assert not (model_dir.parent / f"{model_dir.name}_fixed").exists()

