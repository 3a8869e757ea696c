"""Losses called as loss(logits, targets) -> scalar."""

from torch import nn


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Cross-entropy on logits (B, C) and class indices (B,), with optional label smoothing."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing=label_smoothing)
