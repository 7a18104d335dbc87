"""When two cells disagree: name the first diverging stage of the forward pass, or decode step, and its likely cause.

`opensci-patch diagnose A B` runs one forward pass of the same checkpoint on both cells (each in its
own per-release env, prepared per model variant with the matrix's hotfix arguments), records every
stage of it, runs the independent fp64 forward of `opensci_patch.measure.reference` on the same tokens, and
compares stage by stage in forward order. When the forward agrees it goes on to the decode loop:
what `generate` hands the model at each step, each step's logits against the other cell and against
the same step recomputed without a cache. The capture records of `report` say *that* two cells
differ; this says *where* (stage, layer, position 0 or later; or decode step) and *why* (named
checks with evidence).

Where things live:
- `stages`: stage names, tolerances, output dirs and the stage writer;
- `probe` (in an env): loads the model, records one forward and the decode loop (`decode`);
- `fp64`: the one place the fp64 reference is used;
- `compare` (in an env): stage rows and which side fp64 blames; `decode`: the decode steps;
- `checks`: the named checks, one registry (`CHECKS`): add a check there;
- `driver` (standard library only): runs the sides in their envs; `report`: verdict and text;
- `cells` (standard library only): two matrix cells to two sides (envs, models hotfixed through the matrix's
  hotfix cache), and the CLI subcommand;
- `worker` (in an env): the probe, reference and compare steps the driver runs in child processes, through the
  one child protocol (`opensci_patch._util.child`) the matrix's capture worker speaks too.

This package imports only the standard library at the top: the driver needs neither torch nor
transformers.
"""

from opensci_patch.diagnose.cells import add_cli_arguments, cmd_diagnose, diagnose
from opensci_patch.diagnose.checks import CHECKS, Check
from opensci_patch.diagnose.decode import DEFAULT_DECODE_STEPS
from opensci_patch.diagnose.driver import DiagnoseError, Side, compare_sides
from opensci_patch.diagnose.report import format_report, verdict
from opensci_patch.diagnose.stages import LAYER_STAGES, TOLERANCE, threshold

__all__ = [
    "CHECKS",
    "DEFAULT_DECODE_STEPS",
    "LAYER_STAGES",
    "TOLERANCE",
    "Check",
    "DiagnoseError",
    "Side",
    "add_cli_arguments",
    "cmd_diagnose",
    "compare_sides",
    "diagnose",
    "format_report",
    "threshold",
    "verdict",
]
