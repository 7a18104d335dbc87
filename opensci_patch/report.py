"""Matrix records -> markdown tables, a plot, and an exit status for CI.

Pure functions of the records, except `write_report`, which writes `results/`. A cell's
verdict compares what happened with what the cell declared (`matrix.expectation`):

- pass: expected to pass, ran, and its logits are bit-identical to the reference cell;
- expected-fail: expected to fail (strict xfail) and failed;
- FAIL: expected to pass and did not (error, wrong answer, or not bit-identical);
- XPASS: expected to fail but passed: upstream changed, the expectation must be updated;
- error: the cell could not run (environment install, crash, hotfix failure).

FAIL and XPASS make the exit status non-zero; so does error.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path

from tabulate import tabulate

from .matrix import MODELS, REFERENCE

BAD = ("FAIL", "XPASS", "error")
_RUN_ERRORS = ("env-error", "crash", "hotfix-error")


def load_records(records_dir: Path) -> list[dict]:
    recs = []
    for p in sorted(Path(records_dir).glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if "cell" in rec:
            recs.append(rec)
    return recs


def _group(rec: dict) -> tuple:
    c = rec["cell"]
    return (c["torch"], c["device"], c["dtype"], c["attn"])


def references(recs: list[dict]) -> dict[tuple, dict]:
    out = {}
    for r in recs:
        c = r["cell"]
        if (c["transformers"], c["model"]) == REFERENCE and r.get("status") == "ok":
            out[_group(r)] = r
    return out


def _succeeded(rec: dict, ref: dict | None) -> tuple[bool, str]:
    if rec.get("status") != "ok":
        return False, rec.get("status", "?")
    if ref is None:
        return False, "no reference cell to compare with"
    if rec["logits_sha256"] != ref["logits_sha256"]:
        return False, "logits differ from the reference cell"
    if rec["generation"]["ids"] != ref["generation"]["ids"]:
        return False, "greedy generation differs from the reference cell"
    return True, ""


def verdict(rec: dict, ref: dict | None) -> tuple[str, str]:
    if rec.get("status") in _RUN_ERRORS:
        return "error", f"{rec['status']}: {rec['error']['message']}"
    ok, why = _succeeded(rec, ref)
    expected = rec["expected"]["outcome"]
    if expected == "xfail":
        return (
            ("XPASS", "expected to fail but passed: " + rec["expected"]["reason"])
            if ok
            else ("expected-fail", rec["expected"]["reason"])
        )
    return ("pass", "") if ok else ("FAIL", why)


def _top10_diff(rec: dict, ref: dict | None) -> float | None:
    if not ref or not rec.get("topk"):
        return None
    ref_logit = {t["id"]: t["logit"] for t in ref["topk"]}
    diffs = [abs(t["logit"] - ref_logit[t["id"]]) for t in rec["topk"] if t["id"] in ref_logit]
    missing = len(rec["topk"]) - len(diffs)
    return float("inf") if missing else max(diffs)


def rows(recs: list[dict]) -> list[dict]:
    refs = references(recs)
    out = []
    order = {m: i for i, m in enumerate(MODELS)}
    for r in sorted(
        recs,
        key=lambda r: (
            _version_key(r["cell"]["transformers"]),
            r["cell"]["torch"],
            r["cell"]["dtype"],
            r["cell"]["attn"],
            order.get(r["cell"]["model"], 9),
        ),
    ):
        ref = refs.get(_group(r))
        v, why = verdict(r, ref)
        t = r.get("target") or {}
        gen = (r.get("generation") or {}).get("text")
        out.append(
            {
                "cell": r["cell"]["id"],
                "transformers": r["cell"]["transformers"],
                "torch": r.get("environment", {}).get("torch", r["cell"]["torch"]),
                "device": _device(r),
                "dtype": r["cell"]["dtype"],
                "attn": r["cell"]["attn"],
                "model": r["cell"]["model"],
                "status": v,
                "paris_logit": t.get("logit"),
                "rank": t.get("rank"),
                "top1": r["topk"][0]["token"] if r.get("topk") else None,
                "top10_max_diff": _top10_diff(r, ref),
                "bit_identical": (r.get("logits_sha256") == ref["logits_sha256"])
                if ref and r.get("logits_sha256")
                else None,
                "fp64_ref_diff": (r.get("reference") or {}).get("max_abs_diff"),
                "greedy": (gen[:40] + "...") if gen and len(gen) > 40 else gen,
                "why": why or (r.get("error") or {}).get("message", ""),
            }
        )
    return out


def _device(rec: dict) -> str:
    """'cpu', or the GPU's name as the capture saw it (e.g. 'cuda: NVIDIA H100 80GB HBM3')."""
    device = rec["cell"]["device"]
    name = rec.get("environment", {}).get("device_name")
    return f"{device}: {name}" if device != "cpu" and name else device


def _version_key(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else 0 for x in v.split("."))


def _fmt(x, spec: str) -> str:
    if x is None:
        return "-"
    if x == float("inf"):
        return "top-10 differs"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return format(x, spec)


def markdown_table(table: list[dict]) -> str:
    headers = [
        "transformers",
        "torch",
        "device",
        "dtype",
        "attn",
        "model",
        "status",
        '" Paris" logit',
        "rank",
        "top-1",
        "max abs diff top-10 vs ref",
        "bit-identical",
        "max abs diff vs fp64 ref",
        "greedy completion",
        "note",
    ]
    body = [
        [
            r["transformers"],
            r["torch"],
            r["device"],
            r["dtype"],
            r["attn"],
            r["model"],
            r["status"],
            _fmt(r["paris_logit"], ".4f"),
            _fmt(r["rank"], "d"),
            repr(r["top1"]) if r["top1"] else "-",
            _fmt(r["top10_max_diff"], ".2e"),
            _fmt(r["bit_identical"], ""),
            _fmt(r["fp64_ref_diff"], ".2e"),
            repr(r["greedy"]) if r["greedy"] else "-",
            r["why"][:120].replace("|", "/"),
        ]
        for r in table
    ]
    return tabulate(body, headers=headers, tablefmt="github")


def changes(table: list[dict], previous: dict[str, str]) -> list[str]:
    """Cells whose verdict moved since the last written report: newly broken first."""
    broken, fixed, other = [], [], []
    for r in table:
        old = previous.get(r["cell"])
        if old is None or old == r["status"]:
            continue
        line = f"- `{r['cell']}`: {old} -> **{r['status']}** {r['why']}"
        (broken if r["status"] in BAD else fixed if old in BAD else other).append(line)
    out = []
    if broken:
        out += ["### Newly broken", *broken]
    if fixed:
        out += ["### Newly fixed", *fixed]
    if other:
        out += ["### Other changes", *other]
    return out


def plot(table: list[dict], path: Path) -> bool:
    """The " Paris" logit per release, original vs patched. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    versions = sorted({r["transformers"] for r in table}, key=_version_key)
    fig, ax = plt.subplots(figsize=(8, 4))
    markers = (("original", "x"), ("structural", "s"), ("patched", "o"), ("patched+init", "^"), ("generated", "d"))
    for model, marker in markers:
        pts = [
            (versions.index(r["transformers"]), r["paris_logit"])
            for r in table
            if r["model"] == model and r["paris_logit"] is not None and r["device"] == "cpu"
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, linestyle="", label=model, markersize=8)
        else:
            ax.plot([], [], marker=marker, linestyle="", label=f"{model} (no logits: failed to load)")
    ax.set_xticks(range(len(versions)), versions, rotation=30)
    ax.set_ylabel('logit of " Paris"')
    ax.set_title('"The capital of France is" -> " Paris", fp32 eager, CPU')
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(
    records_dir: Path, results_dir: Path, *, title: str = "Cross-version matrix", machine: str | None = None, log=print
) -> int:
    """Write results/<...>.md, summary.json and the plot; return the number of bad cells."""
    recs = load_records(records_dir)
    if not recs:
        from .errors import OpensciPatchError

        raise OpensciPatchError(f"{records_dir}: no cell records; run `nox -s matrix` first")
    table = rows(recs)
    results_dir.mkdir(parents=True, exist_ok=True)
    summary_path = results_dir / "summary.json"
    previous = json.loads(summary_path.read_text())["verdicts"] if summary_path.is_file() else {}
    counts: dict[str, int] = {}
    for r in table:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine or f"{platform.machine()}, {platform.platform()}, python {platform.python_version()}"
    lines = [
        f"# {title}",
        "",
        f"Generated {date} on {machine} from {len(recs)} cell records.",
        "",
        "Counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        "",
    ]
    moved = changes(table, previous)
    if moved:
        lines += ["## Changes since the last report", "", *moved, ""]
    ref = " ".join(REFERENCE)
    lines += [
        f"Reference cell: transformers {ref} (same torch build, device, dtype, attention).",
        "",
        markdown_table(table),
        "",
    ]
    has_plot = plot(table, results_dir / "paris_logit.png")
    if has_plot:
        lines += ['![" Paris" logit per release](paris_logit.png)', ""]
    (results_dir / "matrix.md").write_text("\n".join(lines))
    summary_path.write_text(
        json.dumps(
            {"generated": date, "machine": machine, "verdicts": {r["cell"]: r["status"] for r in table}}, indent=2
        )
        + "\n"
    )
    bad = sum(counts.get(k, 0) for k in BAD)
    log(
        f"wrote {results_dir / 'matrix.md'} ({len(table)} cells; "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + ")"
    )
    return bad
