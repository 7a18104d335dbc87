"""Reading a model directory's config.json: the one reader hotfix, capture and the fp64 reference share.

Its errors are `ModelDirError`s (bad input, exit 2) that say what the file is instead of a config object.
"""

from __future__ import annotations

import json
from pathlib import Path

from opensci_patch._util.errors import ModelDirError


def read_config(model_dir: Path) -> dict:
    """`model_dir/config.json` as a dict, or a ModelDirError saying what it is instead."""
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelDirError(f"{model_dir}: no config.json; point at a model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelDirError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelDirError(f"{path}: a JSON {type(data).__name__}, not a config object")
    return data
