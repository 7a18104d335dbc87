"""What a capture runs inside: a private HF modules cache with the hub offline, and library warnings collected.

Remote code is copied by transformers into a modules cache; a stale copy there silently runs old code.
`isolated_hf_cache()` gives each run a fresh, private modules cache and `HF_HUB_OFFLINE=1`; the CLI enters it
before transformers is imported. `collected_warnings()` keeps Python and transformers warnings off stderr and
hands them to the record instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from opensci_patch._util import fs


def _forget_remote_modules() -> None:
    """Drop the `transformers_modules` package (remote code) from sys.modules: its path is a modules cache."""
    import importlib

    for name in [n for n in sys.modules if n == "transformers_modules" or n.startswith("transformers_modules.")]:
        del sys.modules[name]
    importlib.invalidate_caches()


@contextlib.contextmanager
def isolated_hf_cache() -> Iterator[Path]:
    """A fresh, private HF modules cache and offline hub for the duration of one capture (`fs.temp_dir`: removed at
    the end, or by a later capture when this process was killed)."""
    with fs.temp_dir("opensci-hf-modules") as tmp:
        settings = {
            "HF_MODULES_CACHE": str(tmp),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
        saved = {k: os.environ.get(k) for k in settings}
        os.environ.update(settings)
        if "transformers.utils" in sys.modules:  # a later import of dynamic_module_utils would copy the stale path
            import transformers.dynamic_module_utils  # noqa: F401
        dmu = sys.modules.get("transformers.dynamic_module_utils")
        old_cache = getattr(dmu, "HF_MODULES_CACHE", None)
        if dmu is not None:  # transformers already imported: it read the variable at import time
            dmu.HF_MODULES_CACHE = str(tmp)
        _forget_remote_modules()  # a second capture in one process must not import from the first one's cache
        try:
            yield tmp
        finally:
            _forget_remote_modules()
            if dmu is not None:
                dmu.HF_MODULES_CACHE = old_cache
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


class _Collect(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, rec: logging.LogRecord) -> None:
        try:
            message = rec.getMessage()
        except (TypeError, ValueError):  # a library's bad %-format (5.2.0's attn-mask deprecation) is not our crash
            message = f"{rec.msg} (args {rec.args!r})"
        self.sink.append(f"{rec.name}: {message}")


@contextlib.contextmanager
def collected_warnings() -> Iterator[list[str]]:
    """Collect Python warnings and transformers' logger warnings instead of printing them.

    They are evidence for diagnosis (kept in the record) and noise for a one-line error.
    The yielded list is filled (sorted, de-duplicated) when the block ends.
    """
    sink: list[str] = []
    seen: list[str] = []
    handler = _Collect(seen)
    hf_logger = logging.getLogger("transformers")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_logger.addHandler(handler)
        try:
            yield sink
        finally:
            hf_logger.removeHandler(handler)
            sink[:] = sorted(set(seen + [f"{w.category.__name__}: {w.message}" for w in caught]))
