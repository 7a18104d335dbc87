"""Every constant more than one module needs, defined once.

Standard library only: the noxfile, the matrix driver and the GitHub plan job import it with no
torch or transformers around. Change a default here and every command, session and report follows.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
FIXTURE_DIR = DATA_DIR / "opensci-tiny"  # the shipped checkpoint
MANIFEST = "opensci_patch_manifest.json"  # written by hotfix into every directory it makes

DEFAULT_PROMPT = "The capital of France is"
DEFAULT_TARGET = " Paris"
MAX_NEW_TOKENS = 20  # greedy tokens captured per cell (and decode steps checked)

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("eager", "sdpa")
TORCH_BUILDS = ("cpu", "system", "cuda")  # see envs.py for what each means
DEFAULT_TORCH_BUILD = "cpu"
# The CPU/CUDA torch release the "cpu" (and indexed "cuda") builds install: one pin for the noxfile and the envs.
TORCH_PIN = os.environ.get("OPENSCI_PATCH_TORCH_PIN", "2.13.0")
OLDEST_SUPPORTED = "4.48.0"  # the oldest transformers release we make work
