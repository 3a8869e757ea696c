"""Tasks: LightningModules that train a model on a problem."""

import inspect
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics.classification import MulticlassAccuracy

from validation import ConfigError


class MNISTClassification(pl.LightningModule):
    """Ten-way digit classification: logs loss and accuracy under train/, val/ and test/.

    `optimizer` is Hydra's `_partial_` optimizer: everything but the parameters, which
    `configure_optimizers` supplies. `scheduler`, also partial, is stepped every batch; a
    schedule that needs `total_steps` (OneCycleLR) gets the trainer's count. `compile=True`
    compiles the model with `torch.compile` (bench/compute.py shows where that pays).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., Optimizer],
        loss_function: nn.Module,
        scheduler: Callable[..., LRScheduler] | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if compile:
            model.compile()  # in place, so checkpoints keep the plain parameter names
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_function = loss_function
        self.train_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")
        # The first step whose loss was nan or inf, -1 if none. It stays on the device: reading it on
        # the host every step would stall a GPU's queue, so `stop_if_diverged` reads it every log step.
        self.register_buffer("first_nonfinite_step", torch.tensor(-1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.model(x)
        loss = self.loss_function(logits, y)
        self.train_acc.update(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        unseen = self.first_nonfinite_step < 0
        self.first_nonfinite_step = torch.where(
            ~loss.detach().isfinite() & unseen, self.global_step, self.first_nonfinite_step
        )
        return loss

    def on_train_batch_end(self, outputs: object, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.stop_if_diverged()

    def on_train_epoch_end(self) -> None:
        self.stop_if_diverged()

    def stop_if_diverged(self) -> None:
        step = int(self.first_nonfinite_step)
        if step < 0:
            return
        lr = getattr(self.optimizer, "keywords", {}).get("lr")
        setting, fix = (f"task.optimizer.lr={lr}: ", f"task.optimizer.lr={lr / 10:g}") if lr else ("", "a lower lr")
        raise ConfigError(
            f"{setting}the training loss became nan or inf at step {step}, so the learning rate is likely too "
            f"high (or a batch holds bad values); fix: {fix}"
        )

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self.model(x)
        accuracy.update(logits, y)
        # The loss is a plain tensor, averaged over ranks only when asked; the accuracy, a
        # torchmetrics Metric, sums its counts over ranks itself.
        self.log(f"{stage}/loss", self.loss_function(logits, y), prog_bar=True, sync_dist=True)
        self.log(f"{stage}/acc", accuracy, prog_bar=True)

    def configure_optimizers(self) -> Optimizer | dict[str, Any]:
        optimizer = self.optimizer(self.parameters())
        if self.scheduler is None:
            return optimizer
        wanted = inspect.signature(self.scheduler).parameters
        given = getattr(self.scheduler, "keywords", {})
        extra = {}
        if "total_steps" in wanted and "total_steps" not in given:
            extra["total_steps"] = self.trainer.estimated_stepping_batches
        scheduler = self.scheduler(optimizer, **extra)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
