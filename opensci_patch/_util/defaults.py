"""Every constant more than one module needs, defined once.

Standard library only: the noxfile, the matrix driver and the GitHub plan job import it with no
torch or transformers around. Change a default here and every command, session and report follows.
"""

from __future__ import annotations

import os
import re
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
# A torch spec (`cell --torch`, a cell's `torch` field) is a build above or a torch release with its flavour:
# "2.13.0+cpu" (PyTorch's CPU wheel), "2.6.0" (the registry's default wheel: on Linux a CUDA build that runs on the
# CPU too, ~2.9 GB with its nvidia-* wheels). Each is its own cell coordinate, env and shared torch layer.
TORCH_RELEASE = re.compile(r"\d+\.\d+\.\d+(\+[a-z][a-z0-9]*)?")


def is_torch_release(spec: str) -> bool:
    return TORCH_RELEASE.fullmatch(spec) is not None


def torch_pin(spec: str) -> str:
    """The torch release a spec installs: `TORCH_PIN` for the cpu and cuda builds, the release itself otherwise."""
    return spec if is_torch_release(spec) else TORCH_PIN


OLDEST_SUPPORTED = "4.48.0"  # the oldest transformers release we make work
