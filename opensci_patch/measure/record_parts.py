"""The parts of a cell record (`records.Record`): its status and frozen dataclasses for its JSON objects.

Standard library only, like `records`. Each part's `to_dict` is the JSON object on disk and its
`from_dict` reads one back, refusing missing or unknown keys (a field with a default may be missing: records
written before it was added read as its default); lists on disk are tuples here.
"""

from __future__ import annotations

from collections.abc import Callable
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
    RUNNING = "running"  # placeholder written before a cell starts: the cell never finished if it is still there

    @property
    def no_evidence(self) -> bool:
        """The cell could not run, or never finished: the record says nothing about the model."""
        return self in _NO_EVIDENCE


_NO_EVIDENCE = (Status.ENV_ERROR, Status.CRASH, Status.HOTFIX_ERROR, Status.RUNNING)


class _Part:
    """A frozen record part: `to_dict` gives its JSON object, `from_dict` reads one, refusing other keys."""

    @classmethod
    def from_dict(cls, data: Any):
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        required = {f.name for f in fields(cls) if f.default is MISSING}  # type: ignore[arg-type]
        if not isinstance(data, dict) or not required <= set(data) <= set(names):
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{cls.__name__} needs {', '.join(names)}, got {got}")
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
    def from_dict(cls, data: Any) -> Generation:
        gen = super().from_dict(data)
        if not isinstance(gen.ids, list) or not isinstance(gen.step_logits_sha256, list):
            raise ValueError("Generation: ids and step_logits_sha256 must be lists")
        return cls(tuple(gen.ids), gen.text, tuple(gen.step_logits_sha256), KVCheck.from_dict(gen.kv_check))


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


# field -> how its JSON value is read (the parts), for `Record.from_dict`
_READERS: dict[str, Callable[[Any], Any]] = {
    "status": Status,
    "error": ErrorInfo.from_dict,
    "target": Target.from_dict,
    "topk": lambda items: tuple(TopToken.from_dict(t) for t in items),
    "generation": Generation.from_dict,
    "reference": Fp64Reference.from_dict,
    "cell": CellInfo.from_dict,
    "expected": Expected.from_dict,
}
