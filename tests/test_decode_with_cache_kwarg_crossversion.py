"""transformers 5.24.0 hands the KV cache to the model as `cache=`: the hotfixed files must still decode right.

Unpatched for it, the first position's logits stay bit-identical and the greedy text goes wrong from the second
new token (each decode step attends only to itself), and the generated kind fails in the mask helper. So both the
logits and all 20 greedy ids are compared with the shipped model on 4.48.0.
"""

from __future__ import annotations

import pytest
from test_crossversion import capture, generated, models  # noqa: F401  (module fixtures, reused)

pytestmark = pytest.mark.crossversion


@pytest.fixture(scope="module")
def shipped_448(models, tmp_path_factory) -> dict:  # noqa: F811
    rc, rec = capture("4.48.0", models["patched"], tmp_path_factory.mktemp("ref") / "4.48.0-patched.json")
    assert rc == 0, rec.get("error")
    return rec


@pytest.mark.parametrize("kind", ["shipped", "generated"])
def test_hotfixed_file_on_5_24_gives_448s_logits_and_greedy_ids(kind, models, generated, shipped_448, tmp_path):  # noqa: F811
    model = models["patched"] if kind == "shipped" else generated["patched"]
    rc, rec = capture("5.24.0", model, tmp_path / f"5.24.0-{kind}.json")
    assert rc == 0, rec.get("error")
    assert rec["logits_sha256"] == shipped_448["logits_sha256"]
    assert len(rec["generation"]["ids"]) == 20
    assert rec["generation"]["ids"] == shipped_448["generation"]["ids"]
