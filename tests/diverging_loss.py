"""Losses that fail on demand, for the tests: nan from a given step on, or a crash in one DDP process."""

import os

import torch
from torch import Tensor, nn


class NaNFromStep(nn.Module):
    """Cross-entropy, except that training calls from number `step` (counting from 0) on give nan.

    Validation calls (the module is in eval mode then, like the task) are not counted.
    """

    def __init__(self, step: int = 0) -> None:
        super().__init__()
        self.step = step
        self.calls = 0

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        loss = nn.functional.cross_entropy(logits, target)
        if not self.training:
            return loss
        self.calls += 1
        return loss * torch.nan if self.calls > self.step else loss


class CrashOnRankOne(nn.Module):
    """Cross-entropy, except that the DDP process of local rank 1 raises at its first training step."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.training and os.environ.get("LOCAL_RANK") == "1":
            raise RuntimeError("rank 1 failed on purpose")
        return nn.functional.cross_entropy(logits, target)
