"""The code the patches insert into model files, kept as real Python files (linted, importable, tested).

Each file here is a module that imports on its own: a header (its docstring and the imports the inserted code
expects the model file to have, e.g. `import torch`), then sections, each opened by a marker line::

    # --- template: NAME ---

A section is the text from below its marker to the next marker (or the end of the file), blank lines at
both ends dropped. `section(file, NAME)` gives it as the patches insert it: a leading newline, the code, a
trailing newline; the header is never inserted. Names a patch changes in a section are real identifiers
here (e.g. `CONVERTER` in `attn_mask_utils`), replaced by the patch with `str.replace`; each file says which.

The files are not imported by the package: `tests/test_templates.py` imports each in the test env and, marked
crossversion, in the env of every release in `RELEASES` (the releases where the inserted code runs).
"""

from __future__ import annotations

import functools
import re
from importlib import resources

MARK = re.compile(r"^# --- template: (\S+) ---\n", re.MULTILINE)

# file -> the pinned releases its code runs on (tests/test_templates.py imports it in each one's env)
RELEASES: dict[str, tuple[str, ...]] = {
    "attn_mask_utils": ("5.24.0", "5.25.0"),  # only where transformers.modeling_attn_mask_utils is gone
    "stand_ins": ("4.48.0", "4.57.6", "5.2.0", "5.24.0", "5.25.0"),  # each stand-in where its helper is missing
    "old_adapters": ("4.48.0", "5.2.0", "5.24.0"),  # only compared with, never inserted: the releases they ran on
    "inv_freq_check": ("4.48.0", "4.57.6", "5.2.0", "5.24.0", "5.25.0"),  # every release (checks on each forward)
    "buffers_check": ("4.48.0", "4.57.6", "5.2.0", "5.24.0", "5.25.0"),
    "lookups": ("4.48.0", "4.57.6", "5.2.0", "5.24.0", "5.25.0"),  # the guards route to them on every release
}


@functools.cache
def sections(file: str) -> dict[str, str]:
    """{name: section text} of the template file `file` (without `.py`)."""
    text = resources.files(__package__).joinpath(f"{file}.py").read_text(encoding="utf-8")
    parts = MARK.split(text)[1:]  # [name, text, name, text, ...] after the header
    return {name: "\n" + code.strip("\n") + "\n" for name, code in zip(parts[::2], parts[1::2], strict=True)}


def section(file: str, name: str) -> str:
    """One section of a template file, as the patches insert it."""
    return sections(file)[name]
