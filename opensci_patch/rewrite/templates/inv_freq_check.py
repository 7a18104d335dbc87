"""The check inv_freq_guard appends to a rotary class (`patches/inv_freq_guard.py`); its `forward` calls it first.

`class _Template` only carries the method: the patch inserts the method, not the class.
Header (not inserted): `torch`, which the patched file imports.
"""

import torch


# --- template: check ---
class _Template:
    def _opensci_check_inv_freq(self):
        """Make `inv_freq` exactly what `__init__` computes on CPU, in float32 (inv_freq_guard).

        Compared with recomputed values, never with zero: the uninitialised memory transformers 5.x
        leaves in non-persistent buffers after loading is often non-zero garbage.
        """
        rope_type = str(getattr(self, "rope_type", "default"))
        if "dynamic" in rope_type or rope_type == "longrope" or self.inv_freq.is_meta:
            return  # dynamic rope types swap inv_freq at run time on purpose
        inv_freq = self.inv_freq
        try:
            stamp = (inv_freq._version, inv_freq.data_ptr())
        except RuntimeError:  # an inference tensor keeps no version counter: compare every time
            stamp = None
        verified = getattr(self, "_opensci_verified_inv_freq", None)
        if stamp is not None and verified is not None and verified[0] is inv_freq and verified[1] == stamp:
            return  # found correct before and not written or replaced since
        expected = getattr(self, "_opensci_expected_inv_freq", None)
        if expected is None:
            expected = self.rope_init_fn(self.config, torch.device("cpu"))[0].float()
            self._opensci_expected_inv_freq = expected
        if not (
            inv_freq.dtype == expected.dtype
            and inv_freq.shape == expected.shape
            and torch.equal(inv_freq, expected.to(inv_freq.device))
        ):
            from transformers.utils import logging as hf_logging

            hf_logging.get_logger(__name__).warning_once(
                "opensci-patch: the rotary inv_freq buffer did not hold the values __init__ computes (left "
                "uninitialised by loading, or cast to another dtype); recomputed it in float32"
            )
            self.register_buffer("inv_freq", expected.to(inv_freq.device).clone(), persistent=False)
            inv_freq = self.inv_freq
            try:
                stamp = (inv_freq._version, inv_freq.data_ptr())
            except RuntimeError:
                stamp = None
        # the tensor itself is kept, so that its identity cannot pass to a new tensor
        self._opensci_verified_inv_freq = None if stamp is None else (inv_freq, stamp)
