"""Layer 1, measuring one model with the installed transformers: `capture` loads it, runs the forward pass,
greedy decoding and the KV-cache self-check, and returns a typed `records.Record` (its parts in
`record_parts`); `reference` is the independent fp64 forward pass; `compat` holds the feature probes and
the runtime shims for old releases; `library_modules` names a transformers module a release lacks. It imports
only `opensci_patch._util`."""

__all__ = ["capture", "compat", "library_modules", "record_parts", "records", "reference"]
