"""The cell record: one typed shape for what capture writes and the matrix, report and bisect read.

Standard library only: the noxfile and the matrix driver import it with no torch around.

Why one module: a record is the evidence every later step compares. It used to be a plain dict
written in three places (capture, the matrix's error records, the report's expectations) and
read with `.get` chains, so a truncated file, a record of another schema or a missing field was
silently skipped or read as a KeyError. Here a record is written only through `Record.to_json`
and `opensci_patch._util.fs.write_atomic`, and read only through `load`, which refuses anything it cannot vouch for
with one line that names the file and what to do (`RecordError`).
Its parts (`record_parts`: target, top-k, generation with its KV check, fp64 reference, error,
cell, expected) are frozen dataclasses and its status a `Status`; the JSON they write is the same
schema 2 as when they were dicts.

Lifecycle of a matrix cell's record (`records/<cell id>.json`): a run first removes its cells'
previous records; then the record is written once, by the worker that captured the cell, or by the
driver for a cell that never ran there (`matrix/runner.py`). A killed run therefore leaves no record
of a cell it did not finish, never the previous run's result. (Earlier versions wrote a "running"
placeholder first; the report still lists one left behind as an error.)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import stat
import traceback
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from opensci_patch import __version__
from opensci_patch._util.errors import OpensciPatchError
from opensci_patch.measure.record_parts import (  # noqa: F401 (the parts are read as records.<Part>)
    CellInfo,
    ErrorInfo,
    Expected,
    Fp64Reference,
    Generation,
    KVCheck,
    Status,
    Target,
    TopToken,
    _plain,
    read_record,
)

# 2: generation carries `step_logits_sha256` and `kv_check`; statuses generate-mismatch, nonfinite-logits,
# running; matrix error records have the same shape as capture's.
SCHEMA_VERSION = 2

OK = Status.OK
RUNNING = Status.RUNNING
STATUSES = tuple(Status)

# the fields only a matrix cell record has (capture's own record leaves them out)
CELL_FIELDS = ("cell", "expected", "cell_wall_s")


class RecordError(OpensciPatchError):
    """A record file cannot be trusted: unreadable, truncated, another schema, or fields missing."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Record:
    """One capture (and, in the matrix, one cell). Field names are the JSON keys.

    `generation` (schema 2): {"ids", "text", "step_logits_sha256": [sha256 of each decode step's logit
    vector, step 0 being the prompt's forward], "kv_check": {"ok", "tolerance", "max_abs_diff",
    "first_bad_step", "detail"}} where kv_check compares greedy decoding with the KV cache against the
    same steps recomputed without one.

    `environment` (capture's): versions and probes, plus "kernels" ({"installed": version or None,
    "used": whether the loaded model was kernelized}) and "overrides" (the dependency overrides its
    per-release env was built with, `opensci_patch.matrix.overrides`; [] or absent when none) and
    "extra_requirements" (packages `cell --require` added to that env; [] or absent when none).

    `reference`: {"dtype", "max_abs_diff", "target_logit"}, or with "not_applicable": "not applicable: <why>"
    (and the two numbers null) for a model outside the architecture the fp64 reference models.
    """

    settings: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    status: Status = Status.OK
    error: ErrorInfo | None = None
    input_ids: list[int] = field(default_factory=list)
    target: Target | None = None
    topk: tuple[TopToken, ...] = ()
    logits_sha256: str | None = None
    generation: Generation | None = None
    reference: Fp64Reference | None = None
    timings: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    tool_version: str = __version__
    created: str = field(default_factory=_now)
    # matrix cells only: the cell; what it declared (matrix.Expectation); the cell's wall time
    cell: CellInfo | None = None
    expected: Expected | None = None
    cell_wall_s: float | None = None

    def to_dict(self) -> dict:
        """The JSON object; the matrix-only fields are left out while unset (capture's own record)."""
        data = {f.name: _plain(getattr(self, f.name)) for f in fields(self)}
        for key in CELL_FIELDS:
            if data[key] is None:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Record:
        """The record of a JSON object (`to_dict`'s inverse); anything a record must not be is a one-line ValueError
        (`record_parts.read_record`, which holds every rule)."""
        return cls(**read_record(cls, data, optional=CELL_FIELDS))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @property
    def cell_id(self) -> str | None:
        return self.cell.id if self.cell else None


def one_line(text: str) -> str:
    """The first non-empty line: record messages are shown in one table cell or one stderr line."""
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def error_info(exc: BaseException) -> ErrorInfo:
    """The `error` field for an exception: type, one-line message, traceback tail."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return ErrorInfo(type(exc).__name__, one_line(str(exc)), tb[-3000:])


def error_record(cell: Any, status: str, exc_type: str, message: str, log_tail: str, *, expected: Any = None) -> Record:
    """The one constructor of records for cells that did not produce a capture record themselves.

    Same shape as a capture record (so `load` and the report read both alike), with the cell filled in.
    """
    if status not in STATUSES or status == OK:
        raise ValueError(f"error_record: status {status!r} is not an error status ({', '.join(STATUSES[1:])})")
    c = CellInfo.of(cell)
    return Record(
        settings={"device": c.device, "dtype": c.dtype, "attn": c.attn},
        environment={"transformers": c.transformers},
        model={"patched": c.model != "original"},
        status=Status(status),
        error=ErrorInfo(exc_type, one_line(message), log_tail),
        cell=c,
        expected=None if expected is None else Expected.of(expected),
    )


def _fail(path: Path, what: str, todo: str = "delete it and re-run the cell that writes it") -> RecordError:
    return RecordError(f"{path}: {what}; {todo}")


MAX_RECORD_BYTES = 256 << 20  # a record is kilobytes; 100 MB ones (a huge warnings list) still load


def _read_bounded(path: Path) -> str:
    """The text of a regular file of at most `MAX_RECORD_BYTES`; anything else (a FIFO, a device or a link to
    one, a directory) is refused before it is opened for reading, so it can neither block nor fill memory."""
    not_regular = _fail(path, "not a regular file (a FIFO, a device, a directory or a link to one)", "remove it")
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise not_regular
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # made a FIFO since the stat: no block
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise not_regular
            data = fh.read(MAX_RECORD_BYTES + 1) if info.st_size <= MAX_RECORD_BYTES else b""
        if info.st_size > MAX_RECORD_BYTES or len(data) > MAX_RECORD_BYTES:
            raise _fail(path, f"larger than {MAX_RECORD_BYTES} bytes, not a record", "remove it")
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(path, f"cannot read ({getattr(exc, 'strerror', None) or exc})", "check the path") from None


def load(path: Path | str) -> Record:
    """Read one record, or raise `RecordError` with one line naming the file and what to do.

    Refused here: what is not a regular file (read: a FIFO, a device, a link to one), a file over
    `MAX_RECORD_BYTES`, unreadable files, invalid, truncated or too deeply nested JSON, a missing or unknown
    schema_version; then whatever `Record.from_dict` refuses (missing or unknown fields, wrong field types,
    statuses whose promised fields are absent).
    """
    path = Path(path)
    text = _read_bounded(path)
    if not text.strip():
        raise _fail(path, "empty file (the writer was killed?)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # cut short (a killed writer): the parser ran off the end, or a string never closes
        cut = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
        what = "truncated JSON" if cut else f"invalid JSON ({exc.msg}, line {exc.lineno})"
        raise _fail(path, what) from None
    except RecursionError:
        raise _fail(path, "JSON nested too deeply to be a record") from None
    if not isinstance(data, dict):
        raise _fail(path, f"a JSON {type(data).__name__}, not a record object")
    version = data.get("schema_version")
    if version is None:
        raise _fail(path, "no schema_version (not an opensci-patch record, or one older than schema 2)")
    if version != SCHEMA_VERSION:
        raise _fail(
            path,
            f"schema_version {version!r}, this opensci-patch reads {SCHEMA_VERSION}",
            "re-run the cell with this version (or report with the version that wrote it)",
        )
    try:
        return Record.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise _fail(path, one_line(str(exc))) from None
