"""A torch release is a cell coordinate: `--torch 2.13.0+cpu` / `--torch 2.6.0` next to the builds (cpu, system,
cuda). Cell ids, env names, torch layers and the report's groups carry it, so no two torch releases collide.
Installs are faked here: no torch is downloaded."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from test_envs import fake_venv

from opensci_patch._util import procs
from opensci_patch._util.errors import OpensciPatchError
from opensci_patch.matrix import envs, torch_links, venv
from opensci_patch.matrix.spec import Cell, torch_spec
from opensci_patch.measure.records import CellInfo, Expected, Generation, KVCheck, Record, Target, TopToken
from opensci_patch.results import judge


def test_a_torch_release_is_a_field_of_the_cell_and_its_id():
    cell = Cell.parse("4.48.0:2.6.0:bfloat16:sdpa")
    assert (cell.torch, cell.dtype, cell.attn, cell.device) == ("2.6.0", "bfloat16", "sdpa", "cpu")
    assert cell.id == "tf4.48.0-2.6.0-patched-bfloat16-sdpa" and Cell.parse(cell.id) == cell
    ids = {Cell("5.25.0", t).id for t in ("cpu", "system", "2.13.0+cpu", "2.6.0", "2.14.1")}
    assert len(ids) == 5
    assert Cell.parse("tf5.25.0-2.13.0+cpu-patched-float32-eager").torch == "2.13.0+cpu"


@pytest.mark.parametrize("bad", ["2.6", "2.6.O", "torch==2.6.0", "2.6.0+", "../2.6.0", "2.6.0+CPU/x"])
def test_a_torch_spec_that_is_no_build_or_release_is_refused(bad):
    with pytest.raises(OpensciPatchError, match="no torch build"):
        torch_spec(bad)


def test_cell_refuses_a_bad_torch_spec_with_exit_2_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "opensci_patch.cli", "cell", "--transformers", "4.48.0",
                           "--torch", "2.6.O", "--records", str(tmp_path / "r")],
                          capture_output=True, text=True, env=procs.child_env(), timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "argument --torch: torch '2.6.O' is no torch build" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "r").exists()


def test_each_torch_release_has_its_own_env_layer_and_requirement():
    root = Path("/root-of-envs")
    names = {envs.env_name("5.25.0", t) for t in ("cpu", "2.13.0+cpu", "2.6.0")}
    layers = {torch_links.torch_layer_path(t, root) for t in ("cpu", "2.13.0+cpu", "2.6.0")}
    assert len(names) == 3 and len(layers) == 3
    assert torch_links.torch_install_args("2.6.0")[0] == "torch==2.6.0"  # as named: no "+cpu" added
    assert torch_links.torch_install_args("2.13.0+cpu")[0] == "torch==2.13.0+cpu"


@pytest.fixture
def fake_installs(monkeypatch) -> list[list[str]]:
    """venvs made in milliseconds; a layer's `torch==X` install leaves a torch X distribution; no download."""
    ran: list[list[str]] = []

    def run_installer(cmd, cwd, name):
        ran.append(cmd)
        if "venv" in cmd:
            fake_venv(Path(cmd[-1]))
            return
        wanted = [a.split("==", 1)[1] for a in cmd if a.startswith("torch==")]
        if wanted:
            site = venv.site_packages(Path(cmd[cmd.index("--python") + 1]).parents[1])
            (site / f"torch-{wanted[0]}.dist-info").mkdir()
            (site / f"torch-{wanted[0]}.dist-info" / "METADATA").write_text(
                f"Metadata-Version: 2.1\nName: torch\nVersion: {wanted[0]}\n"
            )
            (site / "torch").mkdir()

    def versions(env):
        torch = env.torch_build if env.torch_build[0].isdigit() else metadata.version("torch")
        return {"python": sys.version.split()[0], "torch": torch, "transformers": "4.48.0", "torch_available": True}

    monkeypatch.setattr(procs, "find_uv", lambda: "uv")
    monkeypatch.setattr(procs, "run_installer", run_installer)
    monkeypatch.setattr(envs, "installed_versions", versions)
    return ran


def test_two_torch_releases_get_two_envs_that_are_each_reused(tmp_path, fake_installs):
    """Before: `--torch 2.14.1` was refused; through `system` two torches shared one env, rebuilt at each switch."""
    a = envs.ensure_env("4.48.0", "2.6.0", root=tmp_path, log=lambda m: None, overrides=[])
    b = envs.ensure_env("4.48.0", "2.14.1", root=tmp_path, log=lambda m: None, overrides=[])
    assert a.path != b.path and a.path.name == f"tf4.48.0-2.6.0-py{sys.version_info[0]}.{sys.version_info[1]}"
    torches = [cmd for cmd in fake_installs if any(x.startswith("torch==") for x in cmd)]
    assert [next(x for x in cmd if x.startswith("torch==")) for cmd in torches] == ["torch==2.6.0", "torch==2.14.1"]
    assert envs.ensure_env("4.48.0", "2.6.0", root=tmp_path, log=lambda m: None, overrides=[]).reused
    assert envs.ensure_env("4.48.0", "2.14.1", root=tmp_path, log=lambda m: None, overrides=[]).reused


def record(version: str, torch: str, steps: tuple[str, ...]) -> Record:
    return Record(
        environment={"transformers": version, "torch": torch},
        target=Target(" Paris", 5, 14.5, 1),
        topk=(TopToken(5, " Paris", 14.5),),
        logits_sha256="a" * 64,
        generation=Generation((5, 6), " Paris.", steps, KVCheck(True, 0.5, 0.0, None, "")),
        cell=CellInfo.of(Cell(version, torch, "patched", "bfloat16", "sdpa")),
        expected=Expected("pass", ""),
    )


def test_a_cell_is_compared_with_the_reference_release_on_its_own_torch():
    """A decode difference that torch 2.6.0 makes on every release is no transformers FAIL."""
    pinned, other = ("s0", "s1", "s2", "s3"), ("s0", "s1", "s2", "t3")
    recs = [record("4.48.0", "2.13.0+cpu", pinned), record("5.25.0", "2.13.0+cpu", pinned),
            record("4.48.0", "2.6.0", other), record("5.25.0", "2.6.0", other)]  # fmt: skip
    rows = judge.rows(recs)
    assert {(r.transformers, r.build): r.status for r in rows} == {
        ("4.48.0", "2.13.0+cpu"): "pass", ("5.25.0", "2.13.0+cpu"): "pass",
        ("4.48.0", "2.6.0"): "pass", ("5.25.0", "2.6.0"): "pass",
    }  # fmt: skip
    assert len(judge.grid(rows)) == 2  # one panel per torch release


def _with(rec: Record, logit: float, ids=(5, 6)) -> Record:
    rec.topk = (TopToken(5, " Paris", logit),)
    rec.generation = Generation(tuple(ids), " Paris.", rec.generation.step_logits_sha256, rec.generation.kv_check)
    return rec


def build(recs: list[Record]):
    from opensci_patch.results import report

    return report.build(report.Loaded(records=recs, sources=[f"{r.cell_id}.json" for r in recs]), None)


def test_the_torch_table_names_a_difference_on_every_release_as_torchs():
    pinned, other = ("s0", "s1", "s2", "s3"), ("s0", "s1", "s2", "t3")
    recs = [record("4.48.0", "cpu", pinned), record("5.25.0", "cpu", pinned),
            _with(record("4.48.0", "2.6.0", other), 14.5625), _with(record("5.25.0", "2.6.0", other), 14.5625),
            record("4.48.0", "2.14.1", pinned), record("5.25.0", "2.14.1", pinned)]  # fmt: skip
    rep = build(recs)
    got = {(t.transformers, t.torch): t for t in rep.torch_table}
    assert set(got) == {(v, t) for v in ("4.48.0", "5.25.0") for t in ("2.6.0", "2.14.1")}
    for v in ("4.48.0", "5.25.0"):
        assert got[(v, "2.14.1")].bit_identical and got[(v, "2.14.1")].max_abs_diff is None
        t = got[(v, "2.6.0")]
        assert (t.bit_identical, t.first_step, t.greedy_equal, t.pinned) == (False, 3, True, "cpu")
        assert t.max_abs_diff == pytest.approx(0.0625)
    (note,) = rep.torch_notes
    assert note.startswith("torch 2.6.0 vs cpu (bfloat16, sdpa, patched)") and "torch's difference" in note
    assert "from decode step 3" in note and "greedy ids equal" in note
    assert {r.status for r in rep.table} == {"pass"} and rep.bad == 0
    from opensci_patch.results.render import matrix_markdown, summary_json

    md = matrix_markdown(rep, title="t", date="d", machine="m", grid_png=False, paris_png=False)
    assert "## Torch releases against the pinned torch" in md and "torch's difference" in md
    assert len(summary_json(rep, "d", "m")["torch_table"]) == 4


def test_cells_declared_to_fail_are_not_compared_across_torches():
    """Measured in the matrix: 5.0.0's patched cells (declared: the loaded weights re-initialised) run ok with random
    logits on each torch; comparing them named a "difference" that is the declared failure's, not torch's."""
    pinned, other = ("s0", "s1", "s2", "s3"), ("r0", "r1", "r2", "r3")
    garbage = [record("5.0.0", "cpu", pinned), _with(record("5.0.0", "2.14.1", other), 3.0, ids=(9, 9))]
    for rec in garbage:
        rec.expected = Expected("xfail", "upstream 5.0/5.1: _init_weights runs after loading")
    recs = [record("4.48.0", "cpu", pinned), record("4.48.0", "2.14.1", pinned), *garbage]
    rep = build(recs)
    assert [(t.transformers, t.torch) for t in rep.torch_table] == [("4.48.0", "2.14.1")]
    assert rep.torch_notes == []
    garbage[0].expected = Expected("pass", "")  # the pinned torch's cell alone expected to pass: still not compared
    assert [(t.transformers, t.torch) for t in build(recs).torch_table] == [("4.48.0", "2.14.1")]


def test_a_difference_on_one_release_only_is_not_called_torchs():
    pinned, other = ("s0", "s1", "s2", "s3"), ("s0", "s1", "u2", "u3")
    recs = [record("4.48.0", "cpu", pinned), record("5.25.0", "cpu", pinned),
            record("4.48.0", "2.6.0", pinned), _with(record("5.25.0", "2.6.0", other), 14.0, ids=(5, 7))]  # fmt: skip
    (note,) = build(recs).torch_notes
    assert "on 5.25.0 only, of 2 release(s)" in note and "greedy ids differ" in note and "torch's" not in note


def test_a_difference_on_the_only_release_compared_is_not_said_to_be_that_releases():
    """Measured: structural runs ok on 4.48.0 only; its torch 2.6.0 decode difference was 'on 4.48.0 only'."""
    pinned, other = ("s0", "s1", "s2", "s3"), ("s0", "s1", "s2", "t3")
    (note,) = build([record("4.48.0", "2.13.0+cpu", pinned), record("4.48.0", "2.6.0", other)]).torch_notes
    assert "on 4.48.0, the only transformers release compared" in note and "not told apart" in note
    assert " only, of " not in note


def test_the_research_file_without_sdpa_support_is_a_declared_failure_under_sdpa_only():
    """The default panels run sdpa: the llama-research file (no `_supports_sdpa`) is refused there on every release."""
    import re

    from opensci_patch.matrix.spec import expectation

    message = ("ValueError: ResearchForCausalLM does not support an attention implementation through "
               "torch.nn.functional.scaled_dot_product_attention yet.")  # fmt: skip
    for version in ("4.48.0", "5.0.0", "5.25.0"):
        sdpa = expectation(Cell(version, "cpu", "llama-research", "bfloat16", "sdpa"))
        assert sdpa.outcome == "xfail" and re.search(sdpa.error, message)
    assert expectation(Cell("5.25.0", "cpu", "llama-research", "float32", "eager")).outcome == "pass"
    assert expectation(Cell("5.25.0", "cpu", "patched", "float32", "sdpa")).outcome == "pass"
