"""The driver: prepares each cell's model in its env, runs the probes, the fp64 reference and the comparison.

Standard library only (it runs wherever the CLI runs; torch and transformers live in the
per-release envs): every step that needs them is a child process `python -m opensci_patch.diagnose
probe|reference|compare ...` (`__main__.py`) in the side's interpreter.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from opensci_patch._util.defaults import DEFAULT_PROMPT, FIXTURE_DIR
from opensci_patch._util.errors import OpensciPatchError
from opensci_patch._util.procs import child_env, tail
from opensci_patch.diagnose.checks import result as check_result
from opensci_patch.diagnose.decode import DEFAULT_DECODE_STEPS
from opensci_patch.diagnose.report import format_report, verdict
from opensci_patch.diagnose.stages import (
    MARKER,
    MODEL_INFO,
    RESULT,
    SCHEMA,
    fmt,
    fresh_dir,
    prepare_out,
    read_json,
    write_json,
)
from opensci_patch.matrix.spec import DEFAULT_TORCH_BUILD, TORCH_BUILDS, VARIANTS, Cell
from opensci_patch.measure.capture import REFERENCE_MAX_WEIGHT_BYTES, validate_model_dir

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


def _run_in(side: Side, args: list[str], what: str, timeout: float, ok: Iterable[int] = (0,)) -> str:
    """`side.python -m opensci_patch.diagnose ARGS` with a clean environment; its output, or DiagnoseError."""
    env = child_env({"TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error")})
    if side.pythonpath is not None:
        env["PYTHONPATH"] = str(side.pythonpath)
    try:
        proc = subprocess.run(
            [str(side.python), "-m", "opensci_patch.diagnose", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise DiagnoseError(f"{what} for {side.label} ran over {timeout:.0f} s") from None
    if proc.returncode not in ok:
        raise DiagnoseError(
            f"{what} for {side.label} ({side.describe}) failed with exit {proc.returncode}:\n"
            f"{tail(proc.stdout + proc.stderr, 15)}"
        )
    return proc.stdout + proc.stderr


def _probe_side(side: Side, out: Path, prompt: str, timeout: float, decode_steps: int, attn: str | None = None) -> dict:
    args = ["probe", str(side.model_dir), "--out", str(out), "--dtype", side.dtype, "--attn", attn or side.attn,
            "--device", side.device, "--prompt", prompt, "--decode-steps", str(decode_steps)]  # fmt: skip
    output = _run_in(side, args, "probe", timeout, ok=(0, 1))  # 1: the model failed to load or run (recorded)
    if not (out / MODEL_INFO).is_file():  # exit 1 from a crash of the probe itself
        raise DiagnoseError(f"probe for {side.label} ({side.describe}) crashed:\n{tail(output, 15)}")
    return read_json(out / MODEL_INFO)


def _compare_in(side: Side, out_dir: Path, probes: tuple[Path, Path], ref: Path | None, labels: tuple[str, str],
                timeout: float, name: str, result: dict) -> dict:  # fmt: skip
    t0 = time.monotonic()
    args = ["compare", str(probes[0]), str(probes[1]), "--out", str(out_dir / name), "--labels", ",".join(labels)]
    if ref is not None:
        args += ["--ref", str(ref)]
    _run_in(side, args, "compare", timeout)
    result["timings"][name.removesuffix(".json") + "_s"] = round(time.monotonic() - t0, 1)
    return read_json(out_dir / name)


def _parallel(jobs: list[Callable[[], Any]], parallel: bool) -> list[Any]:
    if not parallel or len(jobs) < 2:
        return [job() for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        return [f.result() for f in [pool.submit(job) for job in jobs]]


def _weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


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
    small = _weights_bytes(ref_model) <= REFERENCE_MAX_WEIGHT_BYTES
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
    infos = _parallel(
        [
            lambda s=s, d=d: _probe_side(s, d, prompt, timeout, decode_steps)
            for s, d in zip((a, b), probe_dirs, strict=True)
        ],
        parallel,
    )
    result["timings"]["probes_s"] = round(time.monotonic() - t0, 1)
    for s, info in zip((a, b), infos, strict=True):
        result["sides"][s.label] |= {
            "status": info["status"],
            "versions": info.get("versions"),
            "peak_rss_mib": info.get("peak_rss_mib"),
            "timings": info.get("timings"),
            "notes": info.get("notes"),
            "error": info.get("error"),
        }
    failed = [(s, i) for s, i in zip((a, b), infos, strict=True) if i["status"] != "ok"]
    if failed:
        why = "; ".join(
            f"{s.label} ({s.describe}) {i['status']}: {i['error']['type']}: {i['error']['message']}" for s, i in failed
        )
        result |= {
            "status": "error",
            "diverged": None,
            "verdict": f"cannot compare: {why}",
            "checks": [],
            "first_divergence": None,
        }
        return _finish(result, out_dir, t0, log)

    ref_dir = None
    if reference == "on" or (reference == "auto" and small):
        t1 = time.monotonic()
        ref_dir = out_dir / "reference"
        ids = ",".join(str(i) for i in infos[0]["input_ids"])
        _run_in(a, ["reference", str(ref_model), "--out", str(ref_dir), "--ids", ids], "fp64 reference", timeout)
        result["timings"]["reference_s"] = round(time.monotonic() - t1, 1)
    result["reference"] = "on" if ref_dir else f"off ({'asked' if reference == 'off' else 'weights over 1 GiB'})"

    labels = (a.label, b.label)
    compared = _compare_in(a, out_dir, probe_dirs, ref_dir, labels, timeout, "compare.json", result)
    checks = compared["checks"]
    first = compared["first_divergence"]
    if first is not None and first["stage"] == "attn_out" and "sdpa" in (a.attn, b.attn):
        checks.append(_attention_rerun(a, b, out_dir, ref_dir, prompt, timeout, parallel, first, result))
    decode = compared.get("decode")
    diverged = first is not None or bool(decode and decode.get("diverged"))
    failed_to_decode = first is None and bool(decode) and decode.get("status") == "error"
    result |= {
        "status": "error" if failed_to_decode else "diverged" if diverged else "agree",
        "diverged": diverged,
        "first_divergence": first,
        "first_divergence_verdict": compared.get("first_divergence_verdict"),
        "checks": checks,
        "missing_stages": compared["missing_stages"],
        "stages": compared["stages"],
        "dtypes": compared["dtypes"],
        "decode": decode,
    }
    result["verdict"] = verdict(result)
    return _finish(result, out_dir, t0, log)


def _attention_rerun(a: Side, b: Side, out_dir: Path, ref: Path | None, prompt: str, timeout: float,
                     parallel: bool, first: dict, result: dict) -> dict:  # fmt: skip
    """First divergence at attn_out with SDPA on a side: does it go away with eager attention on both?"""
    eager = (out_dir / f"probe-{a.label}-eager", out_dir / f"probe-{b.label}-eager")
    _parallel(
        [
            lambda s=s, d=d: _probe_side(s, d, prompt, timeout, 0, attn="eager")
            for s, d in zip((a, b), eager, strict=True)
        ],
        parallel,
    )
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


def _describe(cell: Cell, model_dir: Path | None = None) -> str:
    return (
        f"transformers {cell.transformers} (torch {cell.torch}), {cell.model}, {cell.dtype}, {cell.attn} attention"
        + (f", model {model_dir}" if model_dir is not None else "")
    )


def _prepare_model(cell: Cell, label: str, source: Path, env: Any, workdir: Path, timeout: float, log: Log) -> Path:
    """The model dir `cell` runs: `source` hotfixed in the cell's env by the matrix's own step.

    `worker.HotfixStep.for_variant` is the one definition of a variant's hotfix, so diagnose cannot
    drift from what the matrix runs.
    """
    from opensci_patch.matrix.worker import HotfixStep
    from opensci_patch.matrix.worker import run as run_worker

    if VARIANTS[cell.model].hotfix is None:
        return source
    step = HotfixStep.for_variant(cell.model, source, workdir / f"{source.name}_fixed")
    log(f"hotfix ({cell.model}) in transformers {cell.transformers}: {step.out}")
    workdir.mkdir(parents=True)
    outcome = run_worker(env, [step], workdir, timeout=timeout, on_result=lambda _r: None)
    result = outcome.results.get(0)
    if result is None or result.rc != 0:
        why = result.stderr if result is not None else outcome.log
        raise DiagnoseError(f"hotfix ({cell.model}) for {label} failed:\n{tail(why, 15)}")
    return step.out


def diagnose(
    a: Cell,
    b: Cell,
    model_dir: Path | None = None,
    out_dir: Path = Path("diagnose"),
    *,
    model_dir_b: Path | None = None,
    prompt: str = DEFAULT_PROMPT,
    reference: str = "auto",
    env_root: Path | None = None,
    keep_models: bool = False,
    decode_steps: int = DEFAULT_DECODE_STEPS,
    timeout: float = 900.0,
    log: Log = print,
) -> dict:
    """Name the first stage (or decode step) where cells `a` and `b` disagree on `model_dir`, and the likely cause.

    Each cell runs in its own per-release env (built on first use). The model dir (B's is
    `model_dir_b` when given) is prepared per model variant with `opensci-patch hotfix` inside
    the env of the first cell that needs it (the patches are pure source rewrites, the same in
    every env) under `out_dir/models/`, removed afterwards unless `keep_models`; the user's dirs
    are only read. Returns the result dict (also `out_dir/diagnose.json`): `status` is
    "diverged", "agree" or "error" (a side failed to load or run: a finding, with the error).
    """
    from opensci_patch.matrix.envs import ensure_env

    model_dir = Path(model_dir or FIXTURE_DIR).absolute()
    sources = {"A": model_dir, "B": Path(model_dir_b).absolute() if model_dir_b else model_dir}
    for source in set(sources.values()):
        validate_model_dir(source)
    out_dir = Path(out_dir).absolute()
    cells = (("A", a), ("B", b))
    for label, cell in cells:
        if cell.model not in VARIANTS:
            raise OpensciPatchError(f"unknown model variant {cell.model!r}: choose one of {', '.join(VARIANTS)}")
        if VARIANTS[cell.model].own_checkpoint and sources[label] != FIXTURE_DIR:
            option = "--model" if label == "A" or model_dir_b is None else "--model-b"
            raise OpensciPatchError(f"{cell.model!r} runs the shipped weights under generated code; drop {option}")
    envs = {}
    runs_on = dict(sources)  # the checkpoint each cell runs (hotfixed or not)
    for label, cell in cells:  # bad versions and install failures stop here, before anything is written
        key = (cell.transformers, cell.torch)
        if key not in envs:
            envs[key] = ensure_env(cell.transformers, cell.torch, root=env_root, log=log)
        if VARIANTS[cell.model].own_checkpoint:
            from opensci_patch.fixtures.generated import ensure_generated

            runs_on[label] = ensure_generated(env_root, log=log)
    prepare_out(out_dir)
    models_root = out_dir / "models"
    if any(VARIANTS[c.model].hotfix is not None for _, c in cells):
        fresh_dir(models_root)
    prepared: dict[tuple[str, Path], Path] = {}  # one hotfix per variant and checkpoint
    models: dict[str, Path] = {}
    t0 = time.monotonic()
    try:
        for label, cell in cells:
            key = (cell.model, runs_on[label])
            if key not in prepared:
                workdir = models_root / (
                    label + "-" + "".join(c if c.isalnum() or c in "_.-" else "_" for c in cell.model)
                )
                env = envs[(cell.transformers, cell.torch)]
                prepared[key] = _prepare_model(cell, label, runs_on[label], env, workdir, timeout, log)
            models[label] = prepared[key]
        sides = [
            Side(
                label,
                envs[(c.transformers, c.torch)].python,
                models[label],
                _describe(c, sources[label] if model_dir_b else None),
                c.dtype,
                c.attn,
                c.device,
            )
            for label, c in cells
        ]
        prepare_s = round(time.monotonic() - t0, 1)
        result = compare_sides(
            sides[0],
            sides[1],
            out_dir,
            prompt=prompt,
            reference=reference,
            reference_model=model_dir,
            decode_steps=decode_steps,
            timeout=timeout,
            log=log,
        )
    finally:
        if not keep_models and (models_root / MARKER).exists():
            shutil.rmtree(models_root)
    result["cells"] = {label: asdict(c) | {"id": c.id} for label, c in cells}
    result["model_dir"] = str(model_dir)
    if model_dir_b:
        result["model_dir_b"] = str(sources["B"])
    result["timings"]["prepare_s"] = prepare_s
    write_json(out_dir / RESULT, result)
    return result


# ---------------------------------------------------------------------------------------------
# the CLI's `diagnose` subcommand (cli.py attaches these to its subparser)


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `opensci-patch diagnose A B` (for cli.py to attach to its subparser)."""
    p.add_argument("a", metavar="A", help="cell, e.g. 4.57.6:structural or tf4.57.6-cpu-structural-float32-eager")
    p.add_argument("b", metavar="B", help="cell, e.g. 5.2.0:structural (fields: variant, torch build, dtype, attn)")
    p.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: the shipped fixture)")
    p.add_argument(
        "--model-b",
        type=Path,
        default=None,
        help="checkpoint dir for B only (default: --model), e.g. a modified copy to compare with the original",
    )
    p.add_argument("--out", type=Path, default=Path("diagnose"), help="output dir (default: ./diagnose)")
    p.add_argument(
        "--torch",
        default=DEFAULT_TORCH_BUILD,
        choices=list(TORCH_BUILDS),
        help="torch build for cells that do not name one",
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument(
        "--reference",
        choices=["auto", "on", "off"],
        default="auto",
        help="fp64 reference forward (auto: checkpoints up to 1 GiB)",
    )
    p.add_argument(
        "--decode-steps",
        type=int,
        default=DEFAULT_DECODE_STEPS,
        help=f"greedy decode steps checked when the forward agrees (default {DEFAULT_DECODE_STEPS}; 0: off)",
    )
    p.add_argument("--env-root", type=Path, default=None, help="where the per-release envs live")
    p.add_argument("--keep-models", action="store_true", help="keep the hotfixed model dirs under OUT/models")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Exit 0: the cells agree; 1: they diverge, or a side failed to load or run (both in diagnose.json)."""
    if args.decode_steps < 0:
        raise OpensciPatchError(f"--decode-steps must be 0 (off) or more, not {args.decode_steps}")
    import dataclasses

    from opensci_patch.matrix import releases
    from opensci_patch.matrix import spec as matrix

    a, b = (Cell.parse(spec, torch_build=args.torch) for spec in (args.a, args.b))
    a, b = (dataclasses.replace(c, transformers=releases.canonical(c.transformers, pre=True)) for c in (a, b))
    releases.check_known([a.transformers, b.transformers], matrix.TRANSFORMERS_VERSIONS, root=args.env_root)
    result = diagnose(
        a,
        b,
        args.model,
        args.out,
        model_dir_b=args.model_b,
        prompt=args.prompt,
        reference=args.reference,
        env_root=args.env_root,
        keep_models=args.keep_models,
        decode_steps=args.decode_steps,
        timeout=args.timeout,
        log=lambda m: print(m, flush=True),
    )
    return 0 if result["status"] == "agree" else 1
