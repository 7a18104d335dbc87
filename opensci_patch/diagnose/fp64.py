"""The one place diagnose uses the independent fp64 forward (`opensci_patch.measure.reference`).

Runs inside an env (it imports torch). `reference_probe` records every stage of the fp64 forward
with the same stage writer as the probe, so A, B and the reference line up with no per-side
translation; the rest are the config-derived facts the checks compare a side against (RoPE
inverse frequencies and dimensions, the canonical rotation) and the checkpoint's weight files.
"""

from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

import torch

from opensci_patch.diagnose.stages import StageWriter, fresh_dir
from opensci_patch.measure import reference

read_config = reference.read_config
weight_files = reference.weight_files
head_dim = reference.head_dim
rotary_dim = reference.rotary_dim
apply_rope = reference.apply_rope


def expected_inv_freq(cfg: dict) -> torch.Tensor:
    """1 / theta^(2i/d) recomputed from the config in fp64: what a correct inv_freq buffer holds."""
    return reference.inv_freq(cfg, torch.float64)


def reference_probe(model_dir: Path, out: Path, input_ids: list[int]) -> dict:
    """Every stage of the independent fp64 forward on `input_ids`, written to `out` as a probe's stages are."""
    out = fresh_dir(out)
    cfg = reference.read_config(model_dir)
    writer = StageWriter(out)
    t0 = time.perf_counter()
    reference.forward(reference.load_params(model_dir), cfg, torch.tensor([input_ids]), hook=writer.save)
    shutil.copyfile(model_dir / "config.json", out / "config.json")
    info = {
        "source": "reference",
        "input_ids": input_ids,
        "num_layers": cfg["num_hidden_layers"],
        "dtype": "float64",
        "forward_s": round(time.perf_counter() - t0, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    writer.write_index(info)
    return info
