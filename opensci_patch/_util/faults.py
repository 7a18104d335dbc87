"""Named fault points for the fault-injection tests (tests/test_faults.py).

Standard library only. Outside those tests `OPENSCI_PATCH_FAULT` is unset and a fault point is one
dictionary lookup.
"""

from __future__ import annotations

import os
import signal

FAULT_VAR = "OPENSCI_PATCH_FAULT"  # tests only: "point[#N]:SIGNAL[,point[#N]:SIGNAL...]", see fault_point
_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Send this process the signal that $OPENSCI_PATCH_FAULT names for point `name` (fault-injection tests).

    `OPENSCI_PATCH_FAULT=hotfix.copied:SIGKILL` kills a hotfix right after its copy, deterministically,
    where a timer would hit a different point on every machine. tests/test_faults.py checks that a run
    killed at any named point leaves SRC intact, DST absent or complete, and nothing the next run cannot
    clean up. `point#N` fires at the point's N-th hit in the process (e.g. `hotfix.chunk#3`: while the
    third chunk of the copy is written), so a seeded N reaches places between the named points without
    a timer. Unset (always, outside those tests) this is one dictionary lookup.
    """
    spec = os.environ.get(FAULT_VAR)
    if not spec:
        return
    hit = _hits[name] = _hits.get(name, 0) + 1
    for item in spec.split(","):
        point, _, sig = item.strip().partition(":")
        point, _, nth = point.partition("#")
        if point == name and int(nth or hit) == hit:
            os.kill(os.getpid(), getattr(signal, sig or "SIGKILL"))
