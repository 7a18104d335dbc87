"""The driver: runs two sides' probes, the fp64 reference and the comparison, each in its side's interpreter.

`cells.diagnose` turns two matrix cells into the two sides (their envs and hotfixed models).

Standard library only (it runs wherever the CLI runs; torch and transformers live in the
per-release envs): every step that needs them (a `ProbeStep`, `ReferenceStep` or `CompareStep`) runs in a child
`python -m opensci_patch.diagnose.worker` (`worker.py`) in the side's interpreter, one step per child, through
the one child protocol (`_util/child.py`) the capture worker speaks too. A step that makes no progress for
`timeout` seconds gets its child killed; a terminated driver terminates its children.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opensci_patch._util import child
from opensci_patch._util.defaults import DEFAULT_PROMPT
from opensci_patch._util.errors import OpensciPatchError
from opensci_patch._util.procs import child_env, tail
from opensci_patch.diagnose.checks import result as check_result
from opensci_patch.diagnose.decode import DEFAULT_DECODE_STEPS
from opensci_patch.diagnose.report import format_report, verdict
from opensci_patch.diagnose.stages import (
    MODEL_INFO,
    RESULT,
    SCHEMA,
    fmt,
    prepare_out,
    read_json,
    write_json,
)
from opensci_patch.measure.capture import REFERENCE_MAX_WEIGHT_BYTES, weights_bytes

Log = Callable[[str], object]


class DiagnoseError(OpensciPatchError):
    """A diagnose step crashed (not the model code failing, which is a finding): see the log tail."""


@dataclass(frozen=True)
class Side:
    """One side of a comparison: an interpreter that sees one transformers release, and what to load in it."""

    label: str
    python: Path
    model_dir: Path
    describe: str
    dtype: str = "float32"
    attn: str = "eager"
    device: str = "cpu"
    pythonpath: Path | None = None  # only for an interpreter that does not see opensci_patch by itself

    def json(self) -> dict:
        return {
            "describe": self.describe,
            "python": str(self.python),
            "model_dir": str(self.model_dir),
            "dtype": self.dtype,
            "attn": self.attn,
            "device": self.device,
        }


def _run_in(side: Side, step: object, what: str, timeout: float, ok: Iterable[int] = (0,)) -> str:
    """`step` (a `worker.Step`) in a child `python -m opensci_patch.diagnose.worker` of `side.python` with a clean
    environment; what it wrote on stderr, or DiagnoseError."""
    from opensci_patch.diagnose.worker import step_to_json  # not at import: runpy would warn in the child

    env = child_env({"TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error")})
    if side.pythonpath is not None:
        env["PYTHONPATH"] = str(side.pythonpath)
    done = child.run(side.python, "opensci_patch.diagnose.worker", [step_to_json(step)], env, timeout=timeout)
    if done.timed_out is not None:
        raise DiagnoseError(f"{what} for {side.label} ran over {timeout:.0f} s")
    result = done.results.get(0)
    output = "\n".join(text for text in (done.log, result and result.stderr) if text)
    rc = done.returncode if result is None else result.rc
    if rc not in ok:
        raise DiagnoseError(f"{what} for {side.label} ({side.describe}) failed with exit {rc}:\n{tail(output, 15)}")
    return output


def _probe_side(side: Side, out: Path, prompt: str, timeout: float, decode_steps: int, attn: str | None = None) -> dict:
    from opensci_patch.diagnose.worker import ProbeStep

    step = ProbeStep(side.model_dir, out, side.dtype, attn or side.attn, side.device, prompt, decode_steps)
    output = _run_in(side, step, "probe", timeout, ok=(0, 1))  # 1: the model failed to load or run (recorded)
    if not (out / MODEL_INFO).is_file():  # exit 1 from a crash of the probe itself
        raise DiagnoseError(f"probe for {side.label} ({side.describe}) crashed:\n{tail(output, 15)}")
    return read_json(out / MODEL_INFO)


def _compare_in(side: Side, out_dir: Path, probes: tuple[Path, Path], ref: Path | None, labels: tuple[str, str],
                timeout: float, name: str, result: dict) -> dict:  # fmt: skip
    from opensci_patch.diagnose.worker import CompareStep

    t0 = time.monotonic()
    _run_in(side, CompareStep(probes[0], probes[1], out_dir / name, ref, labels), "compare", timeout)
    result["timings"][name.removesuffix(".json") + "_s"] = round(time.monotonic() - t0, 1)
    return read_json(out_dir / name)


def _parallel(jobs: list[Callable[[], Any]], parallel: bool) -> list[Any]:
    if not parallel or len(jobs) < 2:
        return [job() for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        return [f.result() for f in [pool.submit(job) for job in jobs]]


def compare_sides(
    a: Side,
    b: Side,
    out_dir: Path,
    *,
    prompt: str = DEFAULT_PROMPT,
    reference: str = "auto",
    reference_model: Path | None = None,
    parallel: bool | None = None,
    decode_steps: int = DEFAULT_DECODE_STEPS,
    timeout: float = 900.0,
    log: Log = print,
) -> dict:
    """Probe both sides, run the fp64 reference, compare and run the checks; write `out_dir/diagnose.json`.

    The engine behind `diagnose`; also usable with any two interpreters and model dirs (the
    tests compare a deliberately broken model dir with a good one on one interpreter).
    `reference`: "on", "off", or "auto" (on for checkpoints up to 1 GiB: it holds fp64 weights).
    `parallel` (default: small checkpoints only) probes both sides at once: twice the memory.
    `decode_steps`: greedy steps the probes record (0: none); compared when the forward agrees.
    """
    if reference not in ("auto", "on", "off"):
        raise OpensciPatchError(f"reference {reference!r} not one of auto, on, off")
    t0 = time.monotonic()
    out_dir = Path(out_dir).absolute()
    prepare_out(out_dir)
    ref_model = (reference_model or a.model_dir).absolute()
    small = weights_bytes(ref_model) <= REFERENCE_MAX_WEIGHT_BYTES
    parallel = small if parallel is None else parallel
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "sides": {s.label: s.json() for s in (a, b)},
        "prompt": prompt,
        "out_dir": str(out_dir),
        "timings": {},
    }
    log(f"probing {a.label} ({a.describe}) and {b.label} ({b.describe})")
    probe_dirs = (out_dir / f"probe-{a.label}", out_dir / f"probe-{b.label}")
    infos = _probe_both((a, b), probe_dirs, prompt, timeout, decode_steps, parallel)
    result["timings"]["probes_s"] = round(time.monotonic() - t0, 1)
    failed = _record_probe_outcomes(result, (a, b), infos)
    if failed:
        result |= _cannot_compare(failed)
        return _finish(result, out_dir, t0, log)

    from opensci_patch.measure.reference import not_modelled  # another architecture: "not applicable", no crash

    why = "asked" if reference == "off" else "weights over 1 GiB"
    run_reference = reference == "on" or (reference == "auto" and small)
    if run_reference and (other := not_modelled(ref_model)) is not None:
        run_reference, why = False, f"not applicable: {other}"
    ref_dir = _fp64_reference(a, ref_model, out_dir, infos[0]["input_ids"], timeout, result) if run_reference else None
    result["reference"] = "on" if ref_dir else f"off ({why})"

    labels = (a.label, b.label)
    compared = _compare_in(a, out_dir, probe_dirs, ref_dir, labels, timeout, "compare.json", result)
    first = compared["first_divergence"]
    if first is not None and first["stage"] == "attn_out" and "sdpa" in (a.attn, b.attn):
        compared["checks"].append(_attention_rerun(a, b, out_dir, ref_dir, prompt, timeout, parallel, first, result))
    result |= _outcome(compared)
    result["verdict"] = verdict(result)
    return _finish(result, out_dir, t0, log)


def _probe_both(sides: tuple[Side, Side], dirs: tuple[Path, Path], prompt: str, timeout: float, decode_steps: int,
                parallel: bool, attn: str | None = None) -> list[dict]:  # fmt: skip
    """Each side's probe into its dir (at once when `parallel`); their model infos."""
    jobs = [
        lambda s=s, d=d: _probe_side(s, d, prompt, timeout, decode_steps, attn=attn)
        for s, d in zip(sides, dirs, strict=True)
    ]
    return _parallel(jobs, parallel)


def _record_probe_outcomes(result: dict, sides: tuple[Side, Side], infos: list[dict]) -> list[tuple[Side, dict]]:
    """Each side's probe outcome into `result["sides"]`; returns the sides that failed to load or run, with info."""
    for s, info in zip(sides, infos, strict=True):
        result["sides"][s.label] |= {
            "status": info["status"],
            "versions": info.get("versions"),
            "peak_rss_mib": info.get("peak_rss_mib"),
            "timings": info.get("timings"),
            "notes": info.get("notes"),
            "error": info.get("error"),
        }
    return [(s, i) for s, i in zip(sides, infos, strict=True) if i["status"] != "ok"]


def _cannot_compare(failed: list[tuple[Side, dict]]) -> dict:
    """The result fields when a side failed to load or run: an error, with each failure named."""
    why = "; ".join(
        f"{s.label} ({s.describe}) {i['status']}: {i['error']['type']}: {i['error']['message']}" for s, i in failed
    )
    return {
        "status": "error",
        "diverged": None,
        "verdict": f"cannot compare: {why}",
        "checks": [],
        "first_divergence": None,
    }


def _fp64_reference(a: Side, ref_model: Path, out_dir: Path, input_ids: list[int], timeout: float,
                    result: dict) -> Path:  # fmt: skip
    """The fp64 reference forward of `ref_model` on the probes' tokens, in A's interpreter; its output dir."""
    t1 = time.monotonic()
    ref_dir = out_dir / "reference"
    from opensci_patch.diagnose.worker import ReferenceStep

    _run_in(a, ReferenceStep(ref_model, ref_dir, tuple(input_ids)), "fp64 reference", timeout)
    result["timings"]["reference_s"] = round(time.monotonic() - t1, 1)
    return ref_dir


def _outcome(compared: dict) -> dict:
    """The result fields of a comparison: diverged (forward or decode), agree, or error (the decode loop failed)."""
    first = compared["first_divergence"]
    decode = compared.get("decode")
    diverged = first is not None or bool(decode and decode.get("diverged"))
    failed_to_decode = first is None and bool(decode) and decode.get("status") == "error"
    return {
        "status": "error" if failed_to_decode else "diverged" if diverged else "agree",
        "diverged": diverged,
        "first_divergence": first,
        "first_divergence_verdict": compared.get("first_divergence_verdict"),
        "checks": compared["checks"],
        "missing_stages": compared["missing_stages"],
        "stages": compared["stages"],
        "dtypes": compared["dtypes"],
        "decode": decode,
    }


def _attention_rerun(a: Side, b: Side, out_dir: Path, ref: Path | None, prompt: str, timeout: float,
                     parallel: bool, first: dict, result: dict) -> dict:  # fmt: skip
    """First divergence at attn_out with SDPA on a side: does it go away with eager attention on both?"""
    eager = (out_dir / f"probe-{a.label}-eager", out_dir / f"probe-{b.label}-eager")
    _probe_both((a, b), eager, prompt, timeout, 0, parallel, attn="eager")
    again = _compare_in(a, out_dir, eager, ref, (a.label, b.label), timeout, "compare-eager.json", result)
    again = again["first_divergence"]
    gone = again is None or again["key"] != first["key"]
    text = f"with eager attention on both sides the divergence at {first['key']} " + (
        "disappears" + (f" (next: {again['key']})" if again else ": the attention kernel (SDPA) differs")
        if gone
        else f"persists ({fmt(again.get('ab_rest'))} at positions > 0): not the attention kernel"
    )
    return check_result("attention_kernel", None, gone, text)


def _finish(result: dict, out_dir: Path, t0: float, log: Log) -> dict:
    result["timings"]["total_s"] = round(time.monotonic() - t0, 1)
    write_json(out_dir / RESULT, result)
    for line in format_report(result):
        log(line)
    log(f"details: {out_dir / RESULT}")
    return result
