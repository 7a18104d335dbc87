"""Diagnose's child process, in one side's interpreter: probe, reference and compare steps.

`python -m opensci_patch.diagnose.worker` speaks the one child protocol (`_util/child.py`, as the capture worker
does): a JSON list of steps on stdin, each `{"kind": "probe" | "reference" | "compare", ...its fields}`, one
`StepResult` line per finished step on stdout. A step writes its outputs (a probe dir, compare.json) itself; its
result says only how it ended (rc 1 from a probe: the model failed to load or run, recorded in its model info).
The driver (`driver.py`) runs one step per process. Users run `opensci-patch diagnose A B`.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from opensci_patch._util import child
from opensci_patch._util.defaults import DEFAULT_PROMPT
from opensci_patch.diagnose.decode import DEFAULT_DECODE_STEPS


@dataclass(frozen=True)
class ProbeStep:
    """Record every stage of one forward of `model`, and the decode loop, into `out`."""

    model: Path
    out: Path
    dtype: str = "float32"
    attn: str = "eager"
    device: str = "cpu"
    prompt: str = DEFAULT_PROMPT
    decode_steps: int = DEFAULT_DECODE_STEPS  # greedy steps to record (0: none)


@dataclass(frozen=True)
class ReferenceStep:
    """Every stage of the fp64 reference forward of `model` on `ids` (the probe's input_ids), into `out`."""

    model: Path
    out: Path
    ids: tuple[int, ...]


@dataclass(frozen=True)
class CompareStep:
    """Compare two probe dirs (and the reference's), run the checks; the comparison goes to `out` (JSON)."""

    a: Path
    b: Path
    out: Path
    ref: Path | None = None
    labels: tuple[str, str] = ("A", "B")


Step = ProbeStep | ReferenceStep | CompareStep
KINDS: dict[str, type] = {"probe": ProbeStep, "reference": ReferenceStep, "compare": CompareStep}
_PATHS = {"model", "out", "a", "b", "ref"}  # the fields that are paths (strings in JSON)


def step_to_json(step: Step) -> dict:
    kind = next(k for k, cls in KINDS.items() if isinstance(step, cls))
    return {"kind": kind} | {k: str(v) if isinstance(v, Path) else v for k, v in asdict(step).items()}


def step_from_json(data: dict) -> Step:
    fields = {k: v for k, v in data.items() if k != "kind"}
    for k, v in fields.items():
        if k in _PATHS and v is not None:
            fields[k] = Path(v)
        elif isinstance(v, list):
            fields[k] = tuple(v)
    return KINDS[data["kind"]](**fields)


def _probe(step: ProbeStep) -> int:
    from opensci_patch.diagnose.probe import probe

    kw = {k: v for k, v in asdict(step).items() if k not in ("model", "out")}
    info = probe(step.model, step.out, **kw, log=lambda m: print(m, file=sys.stderr))
    return 0 if info["status"] == "ok" else 1


def _reference(step: ReferenceStep) -> int:
    from opensci_patch.diagnose.fp64 import reference_probe

    reference_probe(step.model, step.out, list(step.ids))
    return 0


def _compare(step: CompareStep) -> int:
    from opensci_patch.diagnose.compare import compare
    from opensci_patch.diagnose.stages import write_json

    write_json(step.out, compare(step.a, step.b, step.ref, step.labels))
    return 0


_RUN = {ProbeStep: _probe, ReferenceStep: _reference, CompareStep: _compare}


def run_step(step: Step) -> child.StepOutcome:
    """(exit code, stderr, no value) of one step: the exception mapped as the CLI maps it, or the step's own code."""
    rc, err, code = child.call(lambda: _RUN[type(step)](step))
    return rc or code, err, None


def main() -> int:
    return child.serve("opensci-patch diagnose worker", step_from_json, run_step)


if __name__ == "__main__":  # `python -m opensci_patch.diagnose.worker`: the module's own classes, not __main__'s copies
    from opensci_patch.diagnose.worker import main as _main

    sys.exit(_main())
