"""An exponential moving average of the weights, on Lightning's WeightAveraging."""

from functools import partial

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.trainer.states import TrainerFn


class MovingAverage(WeightAveraging):
    """An exponential moving average of the weights and BatchNorm statistics, updated every step; validation
    and checkpoints use it. `decay` rises as (1 + n) / (10 + n) (timm's ModelEmaV3), so early epochs do not
    validate the random initial weights. Lightning's callback loads the raw weights back whenever a checkpoint
    is loaded, the test of the best one too: here only a resumed fit does."""

    def __init__(self, decay: float = 0.99) -> None:
        super().__init__(multi_avg_fn=partial(moving_average_step, decay=decay))

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


@torch.no_grad()
def moving_average_step(
    averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor, decay: float
) -> None:
    """One update of same-dtype tensors, in the form `AveragedModel` takes as `multi_avg_fn`."""
    steps = int(n_averaged)
    weight = 1 - min(decay, (1 + steps) / (10 + steps))
    for average, tensor in zip(averaged, current, strict=True):
        if average.is_floating_point():
            average.lerp_(tensor, weight)
        else:  # BatchNorm's batch counters
            average.copy_(tensor)
