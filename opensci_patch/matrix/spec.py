"""The cross-version matrix, declared: releases, variants, cells and what each cell must do.

A cell is (transformers release, torch spec: a build or a torch release, model variant, dtype, attention).
Running cells is `runner`'s job; this module only declares, so the noxfile can read it.

This module imports only the standard library (and `packaging`, which nox itself depends on):
the noxfile imports it to build its parametrisation, with no torch or transformers around.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from opensci_patch._util.defaults import ATTENTION, DEFAULT_TORCH_BUILD, DTYPES, TORCH_BUILDS, is_torch_release

# The pinned releases: the first and second supported 4.x, the last 4.x, the 5.x releases with
# known behaviour changes, and the newest 5.x when it was pinned. `opensci-patch releases --sweep`
# adds the latest patch of every minor from the index (releases.py). Edit here only.
TRANSFORMERS_VERSIONS = ["4.48.0", "4.49.0", "4.57.6", "5.0.0", "5.1.0", "5.2.0", "5.23.0", "5.24.0", "5.25.0"]


@dataclass(frozen=True)
class Variant:
    """One model variant a cell can run: which hotfix makes it, and on which checkpoint.

    Adding a variant is one entry in `VARIANTS`: the CLI choices, the noxfile cells, the report's
    grid columns and plot markers all follow from it.
    """

    name: str
    hotfix: tuple[str, ...] | None  # `opensci-patch hotfix` options; None: the original code, unpatched
    description: str
    own_checkpoint: bool = False  # runs its own checkpoint (not --model / the matrix's checkpoint)
    marker: str = "o"  # matplotlib marker in the report's plot
    checkpoint: str = "generated"  # with own_checkpoint: which one (fixtures.own.ensure_checkpoint)
    reference: str = "patched"  # the variant whose reference-release cell this one is compared with
    # promised: the variant must pass on any checkpoint (the patched ones). Unpatched variants (original,
    # structural) show what happens without the fix: on a user's checkpoint their failure is a result, not a FAIL.
    promised: bool = True


# "structural" is what a naive fix does (the three load errors only): it shows the silent RoPE breakage on 5.x.
STRUCTURAL = ("loss_kwargs", "rope_default", "tied_weights")
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("original", None, "the files as shipped", marker="x", promised=False),
        Variant(
            "structural",
            tuple(a for p in STRUCTURAL for a in ("--only", p)),
            "only the three load fixes (a naive fix)",
            marker="s",
            promised=False,
        ),
        Variant("patched", (), "the default patches", marker="o"),
        Variant("patched+init", ("--with", "init_weights"), "the default patches plus init_weights", marker="^"),
        Variant(
            "generated",
            (),
            "the shipped weights under a modular-generated model file, hotfixed (fixtures/generated.py)",
            own_checkpoint=True,
            marker="d",
        ),
        Variant(
            "qwen3-modular",
            (),
            "the generated file on the library's Qwen3Config with an `int | torch.Tensor` annotation, shipped "
            "weights, hotfixed (fixtures/own.py)",
            own_checkpoint=True,
            marker="v",
            checkpoint="qwen3-modular",
        ),
        Variant(
            "llama-research",
            (),
            "our Llama research file (library LlamaConfig, no post_init, GQA 4/2, tied), seeded weights, hotfixed; "
            "compared with its own 4.48.0 cell",
            own_checkpoint=True,
            marker="P",
            checkpoint="llama-research",
            reference="llama-research",
        ),
        Variant(
            "era43",
            (),
            "our 4.3x-era Llama-style files (own config naming num_layers, the 4.3x Cache API, rope_scaling "
            "indexing, config.max_length, removed helper imports), seeded weights, hotfixed; compared with its own "
            "4.48.0 cell",
            own_checkpoint=True,
            marker="*",
            checkpoint="era43",
            reference="era43",
        ),
    )
}
# The dtypes and attentions of the matrix's sessions (`nox -s matrix`, the nox cell sessions, the nightly), on every
# torch build: eager and sdpa (what `from_pretrained` picks by default), float32 and bfloat16. Each (torch, dtype,
# attention) is one panel of the report's grid; a release's cells of every panel share one capture process.
MATRIX_DTYPES = ("float32", "bfloat16")
MATRIX_ATTENTION = ("eager", "sdpa")


def panel_args() -> list[str]:
    """The `opensci-patch cell` options that run every panel of the matrix's sessions."""
    return [*(a for d in MATRIX_DTYPES for a in ("--dtype", d)), *(a for m in MATRIX_ATTENTION for a in ("--attn", m))]


# The shipped checkpoint's declared reference cell (release, variant): CI always keeps this release. The report
# compares each checkpoint with its reference variant on the oldest release where that runs ok (`report
# --reference-release` names another), per torch build / device / dtype / attention.
REFERENCE = ("4.48.0", "patched")
# The checkpoint label of this project's own cells (the shipped fixture and the own-checkpoint variants); a
# `cell --model DIR` checkpoint is labelled by its directory name (`checkpoint_label`).
SHIPPED = ""


def torch_spec(value: str) -> str:
    """A `--torch` value: a build (cpu, system, cuda) or a torch release with its flavour (2.13.0+cpu, 2.6.0)."""
    from opensci_patch._util.errors import OpensciPatchError

    if value in TORCH_BUILDS or is_torch_release(value):
        return value
    raise OpensciPatchError(
        f"torch {value!r} is no torch build ({', '.join(TORCH_BUILDS)}) or release with its flavour (e.g. 2.13.0+cpu, "
        "2.6.0 for the registry's default wheel)"
    )


def checkpoint_label(path: Path) -> str:
    """The label of a `--model DIR` checkpoint in cell ids, record names and the report's columns."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).absolute().name) or "model"


@dataclass(frozen=True)
class Cell:
    transformers: str
    torch: str = DEFAULT_TORCH_BUILD
    model: str = "patched"
    dtype: str = "float32"
    attn: str = "eager"
    checkpoint: str = SHIPPED  # which checkpoint: SHIPPED (ours) or a `--model` dir's label

    @classmethod
    def parse(cls, spec: str, *, torch_build: str = DEFAULT_TORCH_BUILD) -> Cell:
        """A cell from the command line: a matrix cell id (tf5.2.0-cpu-patched-float32-eager[@checkpoint]) or
        VERSION[:FIELD...] where each field is a model variant, torch build, dtype or attention
        (their value sets do not overlap), e.g. 5.2.0:structural or 4.57.6:patched:bfloat16:sdpa."""
        from opensci_patch._util.errors import OpensciPatchError

        m = re.fullmatch(r"tf([^-]+)-([^-]+)-([^-]+)-([^-@]+)-([^-@]+)(?:@(.+))?", spec)
        if m:
            fields = {"transformers": m[1], "torch": m[2], "model": m[3], "dtype": m[4], "attn": m[5]}
            if m[6]:
                fields["checkpoint"] = m[6]
        else:
            version, *rest = spec.split(":")
            fields = {"transformers": version, "torch": torch_build, "model": "patched"}
            kinds = (("model", tuple(VARIANTS)), ("torch", tuple(TORCH_BUILDS)), ("dtype", DTYPES), ("attn", ATTENTION))
            for value in rest:
                kind = next((k for k, values in kinds if value in values), "torch" if is_torch_release(value) else None)
                if kind is None:
                    raise OpensciPatchError(
                        f"cell {spec!r}: {value!r} is no model variant ({', '.join(VARIANTS)}), "
                        f"torch build ({', '.join(TORCH_BUILDS)}) or release, dtype ({', '.join(DTYPES)}) "
                        f"or attention ({', '.join(ATTENTION)})"
                    )
                fields[kind] = value
        torch_spec(fields["torch"])
        allowed = {"model": tuple(VARIANTS), "dtype": DTYPES, "attn": ATTENTION}
        for kind, values in allowed.items():
            if kind in fields and fields[kind] not in values:
                raise OpensciPatchError(
                    f"cell {spec!r}: unknown {kind} {fields[kind]!r}; choose one of {', '.join(values)}"
                )
        return cls(**fields)

    @property
    def device(self) -> str:
        return "cuda" if self.torch == "cuda" else "cpu"

    @property
    def id(self) -> str:
        """Also the record's file name: a `--model` checkpoint's cells carry its label, so none collide."""
        at = f"@{self.checkpoint}" if self.checkpoint != SHIPPED else ""
        return f"tf{self.transformers}-{self.torch}-{self.model}-{self.dtype}-{self.attn}{at}"


@dataclass(frozen=True)
class Expectation:
    """What a cell declares when it runs; the report judges its record against it (`results.judge.judge_cell`).

    outcome "xfail": a rule of EXPECTED_FAILURES covers the cell. Its failure is expected-fail only when it
    shows the rule's signature (`error`: a regex searched in the record's "Type: message" line; `symptom`
    "wrong-logits": it loaded and ran but its logits are wrong, `results.judge`); any other failure is its own.
    strict: the rule names this cell's checkpoint (ours): a pass is XPASS, another failure FAIL. A user's
    checkpoint (`cell --model`) is never strict: a pass is a pass. promised: `Variant.promised`, or ours.
    """

    outcome: str  # "pass" or "xfail"
    reason: str = ""
    error: str | None = None
    symptom: str | None = None
    strict: bool = True
    promised: bool = True


# A rule's measured symptom: the cell ran, but its logits are not the reference cell's (wiped weights, wrong RoPE).
WRONG_LOGITS = "wrong-logits"


@dataclass(frozen=True)
class Rule:
    """A declared expected failure: `variants` on releases in [since, before) fail for `reason`, showing the
    signature (`error` regex on the record's "Type: message", or `symptom`; see `Expectation`).

    Ranges, not lists of releases: a release nobody typed in (the sweep, last night's release) gets
    the right expectation with no edit. Each rule is a measured upstream behaviour (docs/upstream.md).
    It is strict (XPASS when the cell passes) only on the `checkpoints` it names; on any other
    checkpoint it only explains a failure that shows its signature.
    """

    variants: tuple[str, ...]
    reason: str
    since: str | None = None  # inclusive
    before: str | None = None  # exclusive
    error: str | None = None
    symptom: str | None = None
    checkpoints: tuple[str, ...] = (SHIPPED,)
    attn: tuple[str, ...] | None = None  # only these attention implementations (None: any)

    def matches(self, cell: Cell) -> bool:
        from packaging.version import Version  # nox depends on packaging: still importable by the noxfile

        v = Version(cell.transformers)
        return (
            cell.model in self.variants
            and (self.attn is None or cell.attn in self.attn)
            and (self.since is None or v >= Version(self.since))
            and (self.before is None or v < Version(self.before))
        )


EXPECTED_FAILURES: tuple[Rule, ...] = (
    Rule(
        ("original",),
        "original code: ImportError of TransformersKwargs (added in 4.54)",
        before="4.54",
        error=r"ImportError: .*\bTransformersKwargs\b",
    ),
    Rule(
        ("original",),
        "original code: ImportError of LossKwargs (removed in 4.54)",
        since="4.54",
        error=r"ImportError: .*\bLossKwargs\b",
    ),
    Rule(
        ("structural",),
        "structural fixes only: 5.x leaves the non-persistent inv_freq uninitialised after loading, "
        "so RoPE is wrong at positions > 0",
        since="5.0",
        symptom=WRONG_LOGITS,
    ),
    Rule(
        ("patched",),
        "upstream 5.0/5.1: _init_weights runs on every module after loading and the model's "
        "`.data.normal_()` bypasses the per-tensor guard, wiping the loaded weights "
        "(fixed in 5.2; opt-in patch init_weights repairs it)",
        since="5.0",
        before="5.2",
        symptom=WRONG_LOGITS,
    ),
    Rule(
        ("llama-research", "era43"),
        "the research file declares no SDPA support (no `_supports_sdpa`): from_pretrained refuses "
        "attn_implementation='sdpa' on every release",
        error=r"does not support an attention implementation through torch\.nn\.functional\.scaled_dot",
        attn=("sdpa",),
    ),
    Rule(
        ("llama-research", "era43"),
        "upstream 5.0/5.1, as for patched: the file's `.data.normal_()` _init_weights wipes the loaded weights",
        since="5.0",
        before="5.2",
        symptom=WRONG_LOGITS,
    ),
    Rule(
        ("qwen3-modular",),
        "the model code imports transformers.models.qwen3, which transformers has only from 4.51.0 on",
        before="4.51",
        error=r"qwen3",
    ),
)


def expectation(cell: Cell) -> Expectation:
    """What the cell must do: the first rule of EXPECTED_FAILURES that covers it (strict on the checkpoints
    it names, an explanation elsewhere), else pass."""
    ours = cell.checkpoint == SHIPPED
    promised = ours or VARIANTS[cell.model].promised
    for rule in EXPECTED_FAILURES:
        if rule.matches(cell):
            strict = cell.checkpoint in rule.checkpoints
            return Expectation("xfail", rule.reason, rule.error, rule.symptom, strict, promised)
    return Expectation("pass", strict=ours, promised=promised)


def releases_from_env() -> list[str]:
    """The releases the noxfile parametrises: `OPENSCI_PATCH_RELEASES` (space/comma separated, set by
    the workflows' plan step from `opensci-patch releases --sweep`) or else the pinned list plus the
    newest final release on the package index (offline: the pinned list, with a note on stderr)."""
    raw = os.environ.get("OPENSCI_PATCH_RELEASES", "").replace(",", " ").split()
    if not raw:
        from opensci_patch.matrix import releases

        return releases.resolve(TRANSFORMERS_VERSIONS)
    from packaging.version import Version

    from opensci_patch.matrix.releases import canonical

    return sorted({canonical(v, what="OPENSCI_PATCH_RELEASES:", pre=True) for v in raw}, key=Version)


def gpu_present() -> str | None:
    """A reason string when no NVIDIA GPU is usable here, else None."""
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU here (nvidia-smi not found)"
    ok = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return None if ok.returncode == 0 and "GPU" in ok.stdout else "nvidia-smi finds no GPU"

