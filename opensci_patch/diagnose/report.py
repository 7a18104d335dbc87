"""The verdict and the short human report of a diagnosis (standard library only: the driver writes them)."""

from __future__ import annotations

from opensci_patch.diagnose import checks
from opensci_patch.diagnose.stages import fmt, nanmax


def verdict(result: dict) -> str:
    """One paragraph: who is wrong from which stage on and the checks that explain it; else the decode loop."""
    a, b = list(result["sides"])
    first = result["first_divergence"]
    fired = [c for c in result["checks"] if c["fired"]]
    causes_at_any = [c for c in fired if checks.explains(c["name"]) != checks.NO_STAGE]
    if first is None:
        text = f"{a} and {b} agree at every stage"
        off_reference = [c for c in fired if checks.explains(c["name"]) == checks.NO_STAGE]
        if off_reference:
            text += "; but " + "; ".join(c["evidence"] for c in off_reference)
        if causes_at_any:
            text += "; checks that fired anyway: " + "; ".join(c["evidence"] for c in causes_at_any)
        return text + decode_verdict(result.get("decode"), (a, b))
    side = result.get("first_divergence_verdict") or {}
    wrong = side.get("wrong")
    where = first.get("where")
    who = (
        f"{wrong} is wrong" if wrong in (a, b) else "both sides are wrong" if wrong == "both" else f"{a} and {b} differ"
    )
    text = f"{who} from {first['key']} on" + (f", at {where}" if where and where != "shape" else "")
    if wrong is None and "a_ref" in first:
        text = f"{a} and {b} differ from {first['key']} on by rounding noise only"

    def is_cause(c: dict) -> bool:
        allowed = checks.explains(c["name"])
        side_ok = wrong in (None, "both") or c["side"] in (None, wrong)
        return side_ok and (allowed is None or first["stage"] in allowed)

    causes = [c for c in causes_at_any if is_cause(c)]
    others = [c for c in causes_at_any if not is_cause(c)]
    if causes:
        text += "; likely cause: " + "; ".join(c["evidence"] for c in causes)
    elif wrong is not None:
        text += "; no named check explains it: look at the stage's own computation in the probe files"
    if others:
        text += "; also fired: " + "; ".join(c["evidence"] for c in others)
    return text


def decode_verdict(decode: dict | None, labels: tuple[str, str]) -> str:
    """The decode loop's part of the verdict (empty when it was not compared)."""
    if not decode:
        return ""
    a, b = labels
    if decode.get("status") == "skipped":
        return f"; decode steps not compared ({decode.get('why')})"
    findings = decode.get("findings") or []
    if decode.get("status") == "agree" and not findings:
        return (
            f"; and so do all {decode['steps']} decode steps (logits and tokens, each side also matching its "
            "no-cache recomputation)"
        )
    text = " in the forward, but not in the decode loop" if decode.get("diverged") else ""
    first = decode.get("first_step")
    if first is not None:
        text += f": {a} and {b} first differ at decode step {first['step']}"
        if decode.get("first_token") is not None:
            text += f" (tokens from token {decode['first_token']} on)"
    elif decode.get("first_token") is not None:
        text += f": {a} and {b} pick different tokens from token {decode['first_token']} on"
    if findings:
        text += "; " + "; ".join(findings)
    return text


def format_report(result: dict) -> list[str]:
    """The short human report: first divergence with per-position numbers, the checks that fired, the verdict."""
    sides = result["sides"]
    labels = list(sides)
    lines = [f"diagnose: {lab} = {sides[lab]['describe']}" for lab in labels]
    if result["status"] == "error":
        return [*lines, f"verdict: {result['verdict']}"]
    first = result["first_divergence"]
    lines.append(f"prompt {result['prompt']!r}; fp64 reference: {result.get('reference')}")
    if first is None:
        last = result["stages"][-1] if result["stages"] else None
        lines.append(
            "no divergence: every stage agrees within threshold"
            + (
                f" (logits: max|{labels[0]}-{labels[1]}| {fmt(nanmax(last['ab_pos0'], last['ab_rest']))})"
                if last and "ab_pos0" in last
                else ""
            )
        )
        lines += decode_lines(result.get("decode"), labels)
    elif first.get("where") == "shape":
        lines.append(f"first divergence: {first['key']}: {first['why']}")
    else:
        agree0 = first["where"] == "positions > 0 only"
        lines.append(
            f"first divergence: {first['key']}, at {first['where']}" + (" (position 0 agrees)" if agree0 else "")
        )
        lines.append(
            f"  max|{labels[0]}-{labels[1]}|  position 0: {fmt(first['ab_pos0'])}  positions > 0: "
            f"{fmt(first['ab_rest'])}  (threshold {first['threshold']:.1e}, {'/'.join(result['dtypes'])})"
        )
        lines.append("  per position: " + " ".join(fmt(x) for x in first["ab_per_position"]))
        if "a_ref" in first:
            lines.append(
                f"  vs fp64:  {labels[0]} {fmt(first['a_ref_pos0'])} / {fmt(first['a_ref_rest'])}   "
                f"{labels[1]} {fmt(first['b_ref_pos0'])} / {fmt(first['b_ref_rest'])}  "
                f"(position 0 / positions > 0)"
            )
        if result.get("first_divergence_verdict"):
            lines.append(f"  -> {result['first_divergence_verdict']['text']}")
    fired = [c for c in result["checks"] if c["fired"]]
    lines.append("checks fired:" if fired else "checks fired: none")
    lines += [f"  [{c['side'] or '-'}] {c['name']}: {c['evidence']}" for c in fired]
    passed = sorted(
        {
            c["name"] + (f"[{c['side']}]" if c["side"] else "")
            for c in result["checks"]
            if not c["fired"] and not c.get("skipped")
        }
    )
    if passed:
        lines.append("checks passed: " + ", ".join(passed))
    lines.append(f"verdict: {result['verdict']}")
    return lines


def decode_lines(decode: dict | None, labels: list[str]) -> list[str]:
    """Per side: its cached steps against its no-cache recomputation; and A against B."""
    if not decode:
        return ["decode steps: not recorded"]
    if decode.get("status") == "skipped":
        return [f"decode steps: not compared ({decode.get('why')})"]
    lines = []
    if "ab_per_step" in decode:
        first = decode.get("first_step")
        worst = nanmax(*decode["ab_per_step"]) if decode["ab_per_step"] else 0.0
        lines.append(
            f"decode: {decode['steps']} steps; max|{labels[0]}-{labels[1]}| {fmt(worst)}"
            + (f"; first differ at step {first['step']}" if first else "; no step differs")
            + (f"; tokens differ from token {decode['first_token']}" if decode.get("first_token") is not None else "")
        )
    for label in labels:
        side = decode["sides"].get(label) or {}
        if "per_step" not in side:
            continue
        worst = nanmax(*side["per_step"]) if side["per_step"] else 0.0
        lines.append(
            f"  {side['text']}"
            if side.get("text")
            else f"  {label}: every cached step matches its no-cache recomputation (max |diff| {fmt(worst)})"
        )
    lines += [
        f"  {f}" for f in decode.get("findings", []) if not any(f == s.get("text") for s in decode["sides"].values())
    ]
    return lines
