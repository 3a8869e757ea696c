"""Adapters map backbone features to class logits."""

from torch import nn


class LinearAdapter(nn.Linear):
    """One linear layer: (B, in_features) -> (B, out_features)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
