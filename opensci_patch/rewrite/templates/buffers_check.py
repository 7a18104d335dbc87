"""The check init_buffers appends to a class with non-persistent buffers (`patches/init_buffers.py`).

`class _Template` only carries the method: the patch inserts the method, not the class.
Header (not inserted): `torch`, which the patched file imports.
"""

# the inserted code byte for byte as the hotfix has always written it (so its outputs stay the same):
# ruff: noqa: B905

import torch


# --- template: check ---
class _Template:
    def _opensci_check_buffers(self, warn=True):
        """Make each non-persistent buffer hold what `__init__` computes for it, run again on CPU (inv_freq_guard).

        Compared with a fresh module built with the arguments and default dtype `__init__` first had, never
        with zero: what transformers 5.x leaves in these buffers after loading is often non-zero garbage. A
        buffer of another shape than the fresh one's was made by the module itself (a grown cache): kept.
        `_init_weights` (after loading, where it is expected) passes warn=False; `forward` warns once.
        """
        recorded = self.__dict__.get("_opensci_init_args")
        names = self._non_persistent_buffers_set
        buffers = [(n, b) for n, b in self._buffers.items() if b is not None and n in names]
        if recorded is None or any(b.is_meta for _, b in buffers):
            return
        try:
            stamp = [(b, b._version, b.data_ptr()) for _, b in buffers]
        except RuntimeError:  # an inference tensor keeps no version counter: compare every time
            stamp = None
        verified = getattr(self, "_opensci_verified_buffers", None)
        if stamp is not None and verified is not None and len(verified) == len(stamp):
            if all(a[0] is b[0] and a[1:] == b[1:] for a, b in zip(verified, stamp)):
                return  # found correct before and not written or replaced since
        expected = getattr(self, "_opensci_expected_buffers", None)
        if expected is None:
            args, kwargs, dtype = recorded
            default = torch.get_default_dtype()
            try:
                torch.set_default_dtype(dtype)
                with torch.random.fork_rng(devices=[]), torch.device("cpu"):
                    fresh = type(self)(*args, **kwargs)
            finally:
                torch.set_default_dtype(default)
            expected = {n: b for n, b in fresh._buffers.items() if n in fresh._non_persistent_buffers_set}
            if any(b is not None and b.is_meta for b in expected.values()):
                return  # built under a context that puts buffers on meta (init_empty_weights): try again later
            self._opensci_expected_buffers = expected
        for name, buffer in buffers:
            want = expected.get(name)
            if want is None or want.shape != buffer.shape:
                continue
            if want.dtype == buffer.dtype and torch.equal(buffer, want.to(buffer.device)):
                continue
            if warn:
                from transformers.utils import logging as hf_logging

                hf_logging.get_logger(__name__).warning_once(
                    f"opensci-patch: non-persistent buffers of {type(self).__name__} did not hold what __init__ "
                    "computes (left uninitialised by loading, or cast to another dtype); recomputed them"
                )
            self.register_buffer(name, want.to(buffer.device).clone(), persistent=False)
        try:
            now = [self._buffers[n] for n, _ in buffers]
            self._opensci_verified_buffers = [(b, b._version, b.data_ptr()) for b in now]
        except RuntimeError:
            self._opensci_verified_buffers = None
