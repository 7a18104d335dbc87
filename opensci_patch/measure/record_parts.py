"""The parts of a cell record (`records.Record`): its status, frozen dataclasses for its JSON objects, and the
one reader of a record's JSON (`read_record`), which holds every rule a record must meet.

Standard library only, like `records`. Each part's `to_dict` is the JSON object on disk and its
`from_dict` reads one back, refusing missing or unknown keys (a field with a default may be missing: records
written before it was added read as its default); lists on disk are tuples here.
"""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any

try:
    from enum import StrEnum
except ImportError:  # Python 3.10 (per-release envs may run it): the same behaviour, spelled out
    from enum import Enum

    class StrEnum(str, Enum):  # type: ignore[no-redef]
        def __str__(self) -> str:
            return str(self.value)


class Status(StrEnum):
    """A record's status; the values are the strings on disk."""

    OK = "ok"
    # the model code failed: a result of the cell (FAIL or expected-fail)
    LOAD_ERROR = "load-error"
    # the checkpoint's tensors are missing, unused or of the wrong shape for the model (its config)
    WEIGHTS_MISMATCH = "weights-mismatch"
    FORWARD_ERROR = "forward-error"
    GENERATE_ERROR = "generate-error"
    GENERATE_MISMATCH = "generate-mismatch"
    NONFINITE_LOGITS = "nonfinite-logits"
    # the installed transformers does not support the installed torch (its own requirement, `torch_support`):
    # a declared fact about the pair, never run, never a verdict about the model
    UNSUPPORTED_PAIR = "unsupported-pair"
    # the cell could not run at all: never a verdict about the model
    ENV_ERROR = "env-error"
    CRASH = "crash"
    HOTFIX_ERROR = "hotfix-error"
    RUNNING = "running"  # the placeholder earlier versions wrote before a cell started: left behind, it never finished

    @property
    def no_evidence(self) -> bool:
        """The cell could not run, or never finished: the record says nothing about the model."""
        return self in _NO_EVIDENCE


_NO_EVIDENCE = (Status.ENV_ERROR, Status.CRASH, Status.HOTFIX_ERROR, Status.RUNNING)


class _Part:
    """A frozen record part: `to_dict` gives its JSON object, `from_dict` reads one, refusing other keys."""

    @classmethod
    def from_dict(cls, data: Any, where: str = ""):
        """The part of a JSON object; ValueError naming `where` (the field it is read for) if it is another shape."""
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise ValueError(f"{where} is a JSON {type(data).__name__}, not an object")
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in data]  # type: ignore[arg-type]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}")
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def of(cls, value: Any):
        """The part itself, its JSON object, or an object with the same attribute names (duck-typed: records
        cannot import matrix, whose `Cell` and `Expectation` are turned into parts here)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        return cls(**{f.name: getattr(value, f.name) for f in fields(cls)})  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]


def _plain(value: Any) -> Any:
    """JSON values of a record's field: parts to dicts, tuples to lists."""
    if isinstance(value, _Part):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class ErrorInfo(_Part):
    type: str
    message: str  # one line
    traceback_tail: str


@dataclass(frozen=True)
class Target(_Part):
    """The target token (" Paris") at the last prompt position."""

    token: str
    id: int
    logit: float
    rank: int


@dataclass(frozen=True)
class TopToken(_Part):
    id: int
    token: str
    logit: float


@dataclass(frozen=True)
class KVCheck(_Part):
    """Greedy decoding with the KV cache against the same steps recomputed without one."""

    ok: bool
    tolerance: float
    max_abs_diff: float
    first_bad_step: int | None
    detail: str


@dataclass(frozen=True)
class Generation(_Part):
    ids: tuple[int, ...]
    text: str
    step_logits_sha256: tuple[str, ...]  # sha256 of each decode step's logits, step 0 being the prompt's forward
    kv_check: KVCheck

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Generation:
        where = where or cls.__name__
        gen = super().from_dict(data, where)
        for key in ("ids", "step_logits_sha256"):
            if not isinstance(getattr(gen, key), list):
                raise ValueError(f"{where}.{key} is not a list")
        kv_check = KVCheck.from_dict(gen.kv_check, f"{where}.kv_check")
        return cls(tuple(gen.ids), gen.text, tuple(gen.step_logits_sha256), kv_check)


@dataclass(frozen=True)
class Fp64Reference(_Part):
    """The independent fp64 forward (`opensci_patch.measure.reference`) on the same tokens; or, for a model
    outside the architecture it models, why not (`not_applicable`, the two numbers None)."""

    dtype: str
    max_abs_diff: float | None  # max |logit - fp64 logit| over the last position
    target_logit: float | None
    not_applicable: str | None = None  # absent in records written before it existed

    @property
    def applicable(self) -> bool:
        return self.not_applicable is None

    def to_dict(self) -> dict:
        """Without `not_applicable` where it is None: a record written before it existed reads back byte for byte."""
        out = super().to_dict()
        if out["not_applicable"] is None:
            del out["not_applicable"]
        return out


@dataclass(frozen=True)
class CellInfo(_Part):
    """The matrix cell a record is of: `matrix.Cell`'s fields, its id and its device."""

    transformers: str
    torch: str
    model: str
    dtype: str
    attn: str
    id: str
    device: str
    checkpoint: str = ""  # "" ours (matrix.SHIPPED); else the `cell --model DIR` label (absent before it existed)

    @property
    def group(self) -> tuple[str, str, str, str]:
        """The cells compared with one reference cell: same torch build, device, dtype and attention."""
        return (self.torch, self.device, self.dtype, self.attn)


@dataclass(frozen=True)
class Expected(_Part):
    """What a matrix cell declared (`matrix.Expectation`): "pass" or "xfail", why, the failure's signature
    (`error` regex, `symptom`), whether it is strict and whether the variant is promised to pass. Records
    from before the signature read as the old rule: any failure matches, strict, promised."""

    outcome: str
    reason: str
    error: str | None = None
    symptom: str | None = None
    strict: bool = True
    promised: bool = True


# --- reading a record's JSON: every rule in one place -------------------------------------------------------------


@functools.cache
def _declared(record_cls: type) -> dict[str, tuple[Any, bool]]:
    """Field -> (declared type, may be null), from the record class's annotations (declared there, once)."""
    out = {}
    for name, hint in typing.get_type_hints(record_cls).items():
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
        out[name] = (next(a for a in args if a is not type(None)) if optional else hint, optional)
    return out


def _is_part(declared: Any) -> bool:
    return isinstance(declared, type) and issubclass(declared, _Part)


def _json_kind(declared: Any) -> type:
    """The JSON type a field of this declared type has on disk: parts are objects, tuples and lists arrays,
    a status a string."""
    origin = typing.get_origin(declared) or declared
    if _is_part(origin):
        return dict
    if origin is Status:
        return str
    return list if origin in (list, tuple) else origin


def _read_field(name: str, declared: Any, optional: bool, value: Any) -> Any:
    """One field's value read by its declared type (parts, the status); ValueError when it is of another type."""
    if value is None and optional:
        return None
    kind = _json_kind(declared)
    if not isinstance(value, (int, float) if kind is float else kind) or isinstance(value, bool):
        shown = f"{kind.__name__} | None" if optional else kind.__name__
        raise ValueError(f"field {name!r} is {type(value).__name__}, not {shown}")
    if declared is Status:
        if value not in tuple(Status):
            raise ValueError(f"unknown status {value!r} (known: {', '.join(Status)})")
        return Status(value)
    if _is_part(declared):
        return declared.from_dict(value, name)
    items = typing.get_args(declared)[:1]  # tuple[Part, ...]: each item read as the part
    if typing.get_origin(declared) is tuple and _is_part(*items):
        return tuple(items[0].from_dict(v, f"{name}[{i}]") for i, v in enumerate(value))
    return value


def read_record(record_cls: type, data: dict, *, optional: tuple[str, ...]) -> dict:
    """The keyword arguments of `record_cls` (`records.Record`) for a record's JSON object, or ValueError (one
    line) for anything a record must not be: fields missing (but those in `optional`) or unknown, of another type
    than the class declares, parts of another shape, and statuses whose promised fields are absent."""
    declared = _declared(record_cls)
    missing = [n for n in declared if n not in data and n not in optional]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    unknown = sorted(set(data) - set(declared))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} for schema {data['schema_version']}")
    read = {n: _read_field(n, *declared[n], data[n]) for n in declared if n in data}
    for key in ("overrides", "extra_requirements"):
        listed = read["environment"].get(key, [])
        if not (isinstance(listed, list) and all(isinstance(r, str) for r in listed)):
            raise ValueError(f"environment.{key} is not a list of requirement strings")
    _check_promises(read)
    return read


def _check_promises(read: dict) -> None:
    """The fields each status promises, which the report relies on."""
    status, gen = read["status"], read.get("generation")
    shown = repr(status.value)
    described_elsewhere = (Status.GENERATE_MISMATCH, Status.NONFINITE_LOGITS)  # kv_check.detail, the target logit
    if status != Status.OK and status not in described_elsewhere and read.get("error") is None:
        raise ValueError(f"status {shown} without an error description")
    if status in (Status.OK, Status.GENERATE_MISMATCH):
        if gen is None:
            raise ValueError(f"status {shown} without a generation")
        if bool(gen.kv_check.ok) != (status == Status.OK):
            raise ValueError(f"status {shown} contradicts generation.kv_check.ok = {gen.kv_check.ok!r}")
    if status == Status.OK and not isinstance(read.get("logits_sha256"), str):
        raise ValueError("status 'ok' without logits_sha256")
