"""The 1.7B-shaped checkpoint generator, at a tiny size: a valid, sharded, loadable, reproducible checkpoint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors import safe_open

from opensci_patch._util.errors import DestinationError
from opensci_patch.fixtures import bigckpt
from opensci_patch.measure import reference
from opensci_patch.rewrite.hotfix import hotfix

TINY = {"layers": 2, "hidden": 128, "heads": 4, "head_dim": 32, "intermediate": 256, "vocab": 512}
SHARD_BYTES = 100_000  # the 128 kB embedding alone exceeds it: forces many shards


def _quiet(msg: str) -> None:
    pass


def _digests(model: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model.iterdir())}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return bigckpt.generate(
        tmp_path_factory.mktemp("big") / "ckpt", seed=7, shard_bytes=SHARD_BYTES, log=_quiet, **TINY
    )


def test_index_covers_every_tensor_once(tiny: Path) -> None:
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tiny.glob("*.safetensors"))
    assert len(shards) >= 2
    assert shards == [bigckpt.shard_name(i, len(shards)) for i in range(1, len(shards) + 1)]
    assert sorted(set(index["weight_map"].values())) == shards
    cfg = json.loads((tiny / "config.json").read_text())
    expected = {s.name: s.shape for s in bigckpt.tensor_specs(cfg)}
    seen: dict[str, str] = {}
    total = 0
    for shard in shards:
        with safe_open(str(tiny / shard), framework="pt") as f:
            for name in f.keys():
                assert name not in seen, f"{name} in {seen.get(name)} and {shard}"
                seen[name] = shard
                t = f.get_tensor(name)
                assert t.dtype == torch.bfloat16, name
                assert tuple(t.shape) == expected[name], name
                total += t.numel() * t.element_size()
    assert seen == index["weight_map"]
    assert set(seen) == set(expected)
    assert index["metadata"]["total_size"] == total
    assert "lm_head.weight" not in seen  # tied embeddings


def test_config_has_the_requested_shapes(tiny: Path) -> None:
    cfg = json.loads((tiny / "config.json").read_text())
    shape = (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"])
    assert shape == (2, 128, 4, 32)
    assert cfg["num_key_value_heads"] == 4 and cfg["vocab_size"] == 512 and cfg["intermediate_size"] == 256
    assert cfg["torch_dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_opensci.OpensciForCausalLM"
    for f in bigckpt.COPIED_FILES:
        assert (tiny / f).read_bytes() == (bigckpt.FIXTURE_DIR / f).read_bytes()


def test_default_config_is_the_1p7b_shape() -> None:
    cfg = bigckpt.make_config()
    assert cfg["hidden_size"] == 2048 and cfg["num_hidden_layers"] == 24 and cfg["intermediate_size"] == 8192
    assert cfg["num_attention_heads"] == cfg["num_key_value_heads"] == 32 and cfg["head_dim"] == 64
    assert cfg["vocab_size"] == 50304 and cfg["max_position_embeddings"] == 4096 and cfg["rope_theta"] == 100000.0
    n_params = sum(s.numel for s in bigckpt.tensor_specs(cfg))
    assert 1.70e9 < n_params < 1.73e9


def test_values_and_reference_loader(tiny: Path) -> None:
    params = reference.load_params(tiny)
    cfg = reference.read_config(tiny)
    assert set(params) == {s.name for s in bigckpt.tensor_specs(cfg)}
    assert torch.equal(params["model.norm.weight"], torch.ones(128, dtype=torch.float64))
    assert not params["model.layers.1.mlp.up_proj.bias"].any()
    emb = params["model.embed_tokens.weight"]
    assert 0.018 < float(emb.std()) < 0.022 and abs(float(emb.mean())) < 1e-3
    logits = reference.forward(params, cfg, torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()


def test_same_seed_same_bytes_any_shard_size(tiny: Path, tmp_path: Path) -> None:
    again = bigckpt.generate(tmp_path / "again", seed=7, shard_bytes=SHARD_BYTES, log=_quiet, **TINY)
    assert _digests(again) == _digests(tiny)
    one = bigckpt.generate(tmp_path / "one", seed=7, shard_bytes=1 << 30, log=_quiet, **TINY)
    assert len(list(one.glob("*.safetensors"))) == 1
    sharded, single = reference.load_params(tiny, torch.bfloat16), reference.load_params(one, torch.bfloat16)
    assert sharded.keys() == single.keys() and all(torch.equal(sharded[k], single[k]) for k in sharded)
    other = bigckpt.generate(tmp_path / "other", seed=8, shard_bytes=SHARD_BYTES, log=_quiet, **TINY)
    emb = "model.embed_tokens.weight"
    assert not torch.equal(reference.load_params(other, torch.bfloat16)[emb], sharded[emb])


def test_refuses_a_non_empty_destination(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DestinationError, match="not empty"):
        bigckpt.generate(out, log=_quiet, **TINY)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no partial directory left behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(DestinationError, match="not a directory"):
        bigckpt.generate(tmp_path / "file", log=_quiet, **TINY)


def test_cli_refusal_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("x")
    assert bigckpt.main([str(tmp_path), "--layers", "1", "--quiet"]) == 2


def test_an_empty_destination_is_used(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert bigckpt.generate(tmp_path / "empty", log=_quiet, **TINY | {"layers": 1}) == tmp_path / "empty"
    assert (tmp_path / "empty" / "model.safetensors.index.json").is_file()


def test_parse_size() -> None:
    assert bigckpt.parse_size("1GiB") == 1 << 30
    assert bigckpt.parse_size("500MB") == 500_000_000
    assert bigckpt.parse_size("65536") == 65536
    with pytest.raises(Exception, match="not a size"):
        bigckpt.parse_size("lots")


def test_hotfixed_copy_loads_with_installed_transformers(tiny: Path, tmp_path: Path) -> None:
    fixed = tmp_path / "fixed"
    hotfix(tiny, fixed, log=_quiet)
    proc = run_cli(
        "capture",
        str(fixed),
        "--dtype",
        "bfloat16",
        "--reference",
        "off",
        "--max-new-tokens",
        "2",
        "--quiet",
        "--out",
        str(tmp_path / "r.json"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["status"] == "ok" and len(record["generation"]["ids"]) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--heads", "0"], "heads=0"),
        (["--hidden", "0"], "hidden=0"),
        (["--kv-heads", "0"], "kv_heads=0"),
        (["--heads", "-4"], "heads=-4"),
        (["--std", "nan"], "std"),
        (["--std", "0"], "std"),
        (["--rope-theta", "0"], "rope_theta"),
        (["--rope-theta", "inf"], "rope_theta"),
        (["--layers", "1000000000"], "free"),  # refused from the sizes alone, before listing 15e9 tensors
    ],
)
def test_nonsense_shapes_are_one_line_and_exit_2(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    small = ["--vocab", "512", "--hidden", "64", "--intermediate", "64", "--heads", "2"]
    assert bigckpt.main([str(tmp_path / "out"), *small, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert list(tmp_path.iterdir()) == []
