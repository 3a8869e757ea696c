"""A loss that turns nan from a given training step on: a divergence on demand, for the tests."""

import torch
from torch import Tensor, nn


class NaNFromStep(nn.Module):
    """Cross-entropy, except that training calls from number `step` (counting from 0) on give nan.

    Validation calls (the module is in eval mode then, like the task) are not counted.
    """

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step
        self.calls = 0

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        loss = nn.functional.cross_entropy(logits, target)
        if not self.training:
            return loss
        self.calls += 1
        return loss * torch.nan if self.calls > self.step else loss
