"""The in-env entry points the driver runs as child processes, one per side's interpreter:

    python -m opensci_patch.diagnose probe MODEL_DIR --out DIR [--dtype D] [--attn A] [--prompt P] [--decode-steps N]
    python -m opensci_patch.diagnose reference MODEL_DIR --out DIR --ids 1,2,3
    python -m opensci_patch.diagnose compare DIR_A DIR_B [--ref DIR_REF] --out compare.json [--labels A,B]

Users run `opensci-patch diagnose A B` (the CLI), which drives these.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opensci_patch._util.defaults import ATTENTION, DEFAULT_PROMPT, DTYPES
from opensci_patch._util.errors import OpensciPatchError
from opensci_patch._util.options import kwargs_from
from opensci_patch.diagnose.decode import DEFAULT_DECODE_STEPS


def _probe(args: argparse.Namespace) -> int:
    from opensci_patch.diagnose.probe import probe

    info = probe(
        args.model,
        args.out,
        **kwargs_from(args, "dtype", "attn", "device", "prompt", "decode_steps"),
        log=lambda m: print(m, file=sys.stderr),
    )
    print(f"{info['status']}: {args.out}")
    return 0 if info["status"] == "ok" else 1


def _reference(args: argparse.Namespace) -> int:
    from opensci_patch.diagnose.fp64 import reference_probe

    reference_probe(args.model, args.out, [int(x) for x in args.ids.split(",")])
    return 0


def _compare(args: argparse.Namespace) -> int:
    from opensci_patch.diagnose.compare import compare
    from opensci_patch.diagnose.stages import write_json

    labels = tuple(args.labels.split(","))
    write_json(args.out, compare(args.a, args.b, args.ref, (labels[0], labels[1])))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m opensci_patch.diagnose", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="record every stage of one forward, and the decode loop")
    p.add_argument("model", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--attn", default="eager", choices=list(ATTENTION))
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--decode-steps", type=int, default=DEFAULT_DECODE_STEPS, help="greedy steps to record (0: none)")
    p.set_defaults(func=_probe)

    p = sub.add_parser("reference", help="every stage of the fp64 reference forward")
    p.add_argument("model", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ids", required=True, help="comma-separated token ids (the probe's input_ids)")
    p.set_defaults(func=_reference)

    p = sub.add_parser("compare", help="compare two probes (and the reference), run the checks")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--ref", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--labels", default="A,B")
    p.set_defaults(func=_compare)

    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except OpensciPatchError as exc:
        print(f"opensci-patch diagnose: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
