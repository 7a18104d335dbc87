"""The stages of one forward pass, their tolerances, and the writer that streams them to disk.

Standard library at import time (the driver imports the names and thresholds); the writer imports
torch only when it saves a tensor, inside an env.

Thresholds (`TOLERANCE`): a stage diverges when max |A - B| > tol * (1 + max |ref|), the looser
dtype of the two sides setting tol; a side leaves the fp64 reference when max |X - ref| > tol of
its own dtype * (1 + max |ref|). The scale makes the test relative for large activations
(logits) and absolute near zero. tol is 1e-4 for float32: a correct fp32 eager forward of the
fixture stays within 4e-7 * (1 + max|ref|) of fp64 at every stage (TransformerLens uses 5e-5
absolute for fp32 eager), while the bugs this looks for are O(1). 5e-2 for bfloat16: measured,
a correct bf16 forward of the fixture reaches 1.6e-2 * (1 + max|ref|) (k_norm of layer 1; bf16
eps is 7.8e-3 and RMSNorm amplifies), so 1e-2 would call rounding a bug. 1e-2 for float16
(eps 9.8e-4, 8x finer than bf16). The fp64 noise test then separates rounding from bugs: a side
is wrong when it is beyond its own dtype's tolerance from fp64, and a bug is typically orders of
magnitude (`BUG_RATIO`) further from fp64 than the other side. The decode steps use the same
thresholds, with the no-cache recomputation in place of the fp64 reference.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from opensci_patch._util.errors import DestinationError
from opensci_patch._util.fs import write_atomic
from opensci_patch.results.verdict import TOLERANCE, UNKNOWN_DTYPE_TOLERANCE

SCHEMA = 1
INDEX = "index.json"
BUFFERS = "buffers.json"
MODEL_INFO = "model_info.json"
DECODE = "decode.json"  # per decode step: what the model's forward received, and the tokens
DECODE_LOGITS = "decode_logits.pt"  # (steps, vocab): the logits generate produced at each step
NOCACHE_LOGITS = "decode_nocache_logits.pt"  # (steps, vocab): each step recomputed without a cache
RESULT = "diagnose.json"
MARKER = ".opensci-diagnose"  # in every directory diagnose creates: only those are ever replaced

GLOBAL_PRE = ("embed", "rope.cos", "rope.sin")
LAYER_STAGES = (
    "input_norm",
    "q_proj",
    "k_proj",
    "v_proj",
    "q_norm",
    "k_norm",
    "q_rope",
    "k_rope",
    "attn_out",
    "mlp_out",
    "residual",
)
GLOBAL_POST = ("final_norm", "logits")
ROPE_STAGES = frozenset({"rope.cos", "rope.sin", "q_rope", "k_rope"})
# The axis that indexes sequence positions, in the reference's layouts.
SEQ_AXIS = {"rope.cos": 0, "rope.sin": 0, "q_norm": 2, "k_norm": 2, "q_rope": 2, "k_rope": 2}
BUG_RATIO = 100.0  # one side this many times further from fp64 than the other: a bug, not rounding


def seq_axis(stage: str) -> int:
    return SEQ_AXIS.get(stage, 1)


def stage_key(stage: str, layer: int | None) -> str:
    return stage if layer is None else f"layer {layer} {stage}"


def stage_order(num_layers: int) -> list[tuple[str, int | None]]:
    """Forward order of the stages: embedding, RoPE tables, each layer's stages, final norm, logits."""
    order: list[tuple[str, int | None]] = [(s, None) for s in GLOBAL_PRE]
    order += [(s, i) for i in range(num_layers) for s in LAYER_STAGES]
    return order + [(s, None) for s in GLOBAL_POST]


def threshold(dtype_a: str, dtype_b: str, ref_max: float) -> float:
    """The divergence threshold of two tensors of these dtypes whose reference peaks at `ref_max`."""
    tol = max(TOLERANCE.get(dtype_a, UNKNOWN_DTYPE_TOLERANCE), TOLERANCE.get(dtype_b, UNKNOWN_DTYPE_TOLERANCE))
    return tol * (1.0 + ref_max)


def exceeds(x: float, limit: float) -> bool:
    """x is beyond `limit`; NaN always is (a NaN is a divergence, never silently passed)."""
    return math.isnan(x) or x > limit


def nanmax(*xs: float) -> float:
    return math.nan if any(math.isnan(x) for x in xs) else max(xs)


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2e}"


# ---------------------------------------------------------------------------------------------
# output directories and files


def where(pos0: float, rest: float, limit: float) -> str:
    if not exceeds(pos0, limit):
        return "positions > 0 only"
    return "all positions" if exceeds(rest, limit) else "position 0 only"


def ratio(x: float, y: float) -> float:
    """How many times further from fp64 the worse side is (inf when the better one is exact)."""
    if math.isnan(x) or math.isnan(y):
        return math.inf
    lo, hi = min(x, y), max(x, y)
    return hi / lo if lo > 0 else (math.inf if hi > 0 else 1.0)


def side_verdict(row: dict, labels: tuple[str, str]) -> dict:
    """Which side the fp64 reference blames at this stage, and how confidently."""
    a_lab, b_lab = labels
    if row.get("where") == "shape":
        closer = row.get("closer")
        if closer is None:
            return {"wrong": None, "text": row["why"]}
        wrong = b_lab if closer == a_lab else a_lab
        return {"wrong": wrong, "text": f"{row['why']}; {closer} has the reference's shape {row['ref_shape']}"}
    if "a_ref" not in row:
        return {"wrong": None, "text": "no fp64 reference: cannot tell which side is wrong"}
    a, b = row["a_ref"], row["b_ref"]
    bad_a, bad_b = exceeds(a, row["threshold_a"]), exceeds(b, row["threshold_b"])
    if not bad_a and not bad_b:
        return {
            "wrong": None,
            "text": f"both within their dtype's rounding of the fp64 reference ({a_lab} {fmt(a)} <= "
            f"{row['threshold_a']:.1e}, {b_lab} {fmt(b)} <= {row['threshold_b']:.1e}): rounding noise",
        }
    if bad_a and bad_b and ratio(a, b) < BUG_RATIO:
        return {
            "wrong": "both",
            "text": f"both sides differ from the fp64 reference ({a_lab} {fmt(a)}, {b_lab} {fmt(b)})",
        }
    if bad_a != bad_b:  # only one side beyond its own dtype's rounding
        wrong, right = (a_lab, b_lab) if bad_a else (b_lab, a_lab)
    else:  # both beyond, one orders of magnitude further: that one
        wrong, right = (a_lab, b_lab) if (math.isnan(a) or (not math.isnan(b) and a > b)) else (b_lab, a_lab)
    wrong_err, right_err = (a, b) if wrong == a_lab else (b, a)
    return {"wrong": wrong, "text": f"{wrong} is wrong: {fmt(wrong_err)} from reference, {right} {fmt(right_err)}"}


def write_json(path: Path, data: Any) -> None:
    """Indented JSON, atomically (`fs.write_atomic`); `default=str` for paths and the like."""
    write_atomic(path, json.dumps(data, indent=1, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _mark(path: Path) -> None:
    (path / MARKER).write_text("created by opensci_patch.diagnose; safe to delete\n")


def fresh_dir(path: Path) -> Path:
    """An empty directory marked as ours; an existing one is replaced only if we made it."""
    if path.exists():
        if path.is_dir() and (path / MARKER).exists():
            shutil.rmtree(path)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        else:
            raise DestinationError(f"{path} exists and was not made by diagnose; choose another --out")
    path.mkdir(parents=True)
    _mark(path)
    return path


def prepare_out(out_dir: Path) -> None:
    """The top-level output dir: created, or reused when it is ours (its old files are overwritten)."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MARKER).exists())):
        raise DestinationError(f"{out_dir} exists and was not made by diagnose; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    _mark(out_dir)


# ---------------------------------------------------------------------------------------------
# inside an env: the stage writer shared by the probe and the fp64 reference


class StageWriter:
    """Writes each stage tensor to its own file as it is produced and keeps only the index.

    So a probe's peak memory is the weights plus what the model itself holds for one layer.
    """

    def __init__(self, out: Path):
        self.out = out
        self.entries: list[dict] = []
        self.seen: set[tuple[str, int | None]] = set()

    def save(self, stage: str, layer: int | None, tensor: Any) -> None:
        import torch

        if (stage, layer) in self.seen:  # a module called twice: the first call is the forward's own
            return
        self.seen.add((stage, layer))
        # clone: torch.save of a view would write its whole storage; contiguous for the same reason
        t = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        name = f"{stage}.pt" if layer is None else f"L{layer:03d}.{stage}.pt"
        torch.save(t, self.out / name)
        self.entries.append(
            {
                "stage": stage,
                "layer": layer,
                "file": name,
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
                "seq_axis": seq_axis(stage),
            }
        )

    def write_index(self, extra: dict) -> None:
        write_json(self.out / INDEX, {"schema": SCHEMA, **extra, "stages": self.entries})


def read_index(d: Path) -> dict:
    """A probe's (or the reference's) index, with its stages keyed by (stage, layer)."""
    data = read_json(d / INDEX)
    data["by_key"] = {(e["stage"], e["layer"]): e for e in data["stages"]}
    return data


def load_stage(d: Path, entry: dict) -> Any:
    """One stage tensor, in float64 (every comparison is done in fp64)."""
    import torch

    return torch.load(d / entry["file"], map_location="cpu", weights_only=True).double()
