"""Pure helpers of capture."""

from __future__ import annotations


def test_target_rank_is_not_fooled_by_nan_logits():
    import torch

    from opensci_patch.capture import target_rank

    logits = torch.tensor([1.0, 3.0, 2.0])
    assert target_rank(logits, 1) == 1
    assert target_rank(logits, 0) == 3
    assert target_rank(torch.tensor([float("nan"), 3.0]), 0) is None
    assert target_rank(torch.tensor([float("nan"), 3.0, 5.0]), 1) == 2
