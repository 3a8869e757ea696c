"""A stop for a training loss that became nan or inf, before it fills an epoch of checkpoints with nan weights."""

from typing import Any

import pytorch_lightning as pl
import torch


class Diverged(FloatingPointError):
    """The training loss became nan or inf (mnist_extras/errors.py maps it, by name, to its fix)."""


class StopOnDivergence(pl.Callback):
    """Raises `Diverged` once the training loss is not finite, checked on the steps Lightning logs (and reads on
    the host anyway). Decided over all ranks: every DDP process stops at the same step, none waits alone."""

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if batch_idx % trainer.log_every_n_steps or loss is None:  # None: a step that the task skipped
            return
        if trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss.detach()).all()), all=False):
            lr = getattr(getattr(pl_module, "optimizer", None), "keywords", {}).get("lr")
            raise Diverged(
                f"the training loss became nan or inf by step {trainer.global_step - 1}"  # the step just taken
                + (f" with task.optimizer.lr={lr}" if lr is not None else "")
                + ", so the learning rate is likely too high (or a batch holds bad values)"
            )
