"""diagnose's check registry: adding a check is one `Check` entry, and its `explains` decides the verdict."""

from __future__ import annotations

from opensci_patch.diagnose import checks
from opensci_patch.diagnose.report import verdict


def _result(stage: str, fired: list[dict], wrong: str | None = "B") -> dict:
    first = {"key": f"layer 0 {stage}", "stage": stage, "layer": 0, "where": "all positions"}
    return {
        "sides": {"A": {}, "B": {}},
        "first_divergence": first,
        "first_divergence_verdict": {"wrong": wrong, "text": ""},
        "checks": fired,
    }


def test_registry_names_are_unique_and_every_check_says_what_it_explains():
    names = [c.name for c in checks.CHECKS]
    assert len(names) == len(set(names))
    for c in checks.CHECKS:
        assert c.explains is checks.ANY_STAGE or isinstance(c.explains, frozenset), c.name


def test_a_new_check_is_one_registry_entry(monkeypatch):
    """One new entry: run_all runs it, and the verdict names it as the cause only at the stages it explains."""

    def widget(_evidence) -> list[dict]:
        return [checks.result("widget", "B", True, "B's widget is off")]

    monkeypatch.setattr(checks, "CHECKS", (checks.Check("widget", frozenset({"mlp_out"}), widget),))
    fired = checks.run_all(None)  # type: ignore[arg-type]  # the new check ignores the evidence
    assert [c["name"] for c in fired] == ["widget"]
    assert "likely cause: B's widget is off" in verdict(_result("mlp_out", fired))
    at_attention = verdict(_result("attn_out", fired))
    assert "likely cause" not in at_attention and "also fired: B's widget is off" in at_attention


def test_checks_that_explain_no_stage_are_never_named_as_the_cause():
    """matches_reference / fp64_noise describe the divergence itself: never a 'likely cause'."""
    fired = [
        checks.result("matches_reference", "B", True, "B leaves the fp64 reference at layer 0 mlp_out"),
        checks.result("fp64_noise", "B", True, "at layer 0 mlp_out: B is wrong"),
    ]
    text = verdict(_result("mlp_out", fired))
    assert "likely cause" not in text and "also fired" not in text
    assert "no named check explains it" in text


def test_a_fired_check_of_the_other_side_is_no_cause():
    fired = [checks.result("inv_freq_values", "A", True, "inv_freq all zero in A")]
    text = verdict(_result("q_rope", fired, wrong="B"))
    assert "likely cause" not in text and "also fired: inv_freq all zero in A" in text
