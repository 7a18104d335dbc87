"""Layer 1, measuring one model with the installed transformers: `capture` loads it, runs the forward pass,
greedy decoding and the KV-cache self-check (`kv_check`), and returns a typed `records.Record` (its parts in
`record_parts`, where it ran in `provenance`); `input_checks` refuses bad input before a model is built;
`isolation` is the private modules cache and warning collection a capture runs in; `reference` is the
independent fp64 forward pass; `compat` holds the feature probes and the runtime shims for old releases;
`library_modules` names a transformers module a release lacks. It imports only `opensci_patch._util`."""

__all__ = [
    "capture",
    "compat",
    "input_checks",
    "isolation",
    "kv_check",
    "library_modules",
    "provenance",
    "record_parts",
    "records",
    "reference",
]
