"""Named fault points for the fault-injection tests (tests/test_faults.py).

Standard library only. Outside those tests `OPENSCI_PATCH_FAULT` is unset and a fault point is one
dictionary lookup.
"""

from __future__ import annotations

import os
import signal

FAULT_VAR = "OPENSCI_PATCH_FAULT"  # tests only: "point:SIGNAL[,point:SIGNAL...]", see fault_point


def fault_point(name: str) -> None:
    """Send this process the signal that $OPENSCI_PATCH_FAULT names for point `name` (fault-injection tests).

    `OPENSCI_PATCH_FAULT=hotfix.copied:SIGKILL` kills a hotfix right after its copy, deterministically,
    where a timer would hit a different point on every machine. tests/test_faults.py checks that a run
    killed at any named point leaves SRC intact, DST absent or complete, and nothing the next run cannot
    clean up. Unset (always, outside those tests) this is one dictionary lookup.
    """
    spec = os.environ.get(FAULT_VAR)
    if not spec:
        return
    for item in spec.split(","):
        point, _, sig = item.strip().partition(":")
        if point == name:
            os.kill(os.getpid(), getattr(signal, sig or "SIGKILL"))
