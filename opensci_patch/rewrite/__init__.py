"""Layer 1, source rewriting: `hotfix` copies a model directory atomically and applies the `patches` registry
(structure-aware libcst rewrites, one parse per file) to its remote code, writing a manifest. It knows nothing of
measuring or of the matrix; it imports only `opensci_patch._util`."""

__all__ = ["destination", "hashed_copy", "hotfix", "patches"]
