"""Tasks: LightningModules that train a model on a problem."""

import inspect
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from speed import MeasuredSpeed


class Diverged(FloatingPointError):
    """The training loss became nan or inf."""


class MNISTClassification(pl.LightningModule):
    """Ten-way digit classification: logs loss and accuracy under train/, val/ and test/.

    `optimizer` is Hydra's `_partial_` optimizer: everything but the parameters, which
    `configure_optimizers` supplies. `scheduler`, also partial, is stepped every batch; a
    schedule that needs `total_steps` (OneCycleLR) gets the trainer's count. `compile=True`
    compiles the model with `torch.compile` (bench/compute.py shows where that pays).
    `speed="auto"` measures which precision and memory layout train fastest here (speed.py).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., Optimizer],
        loss_function: nn.Module,
        scheduler: Callable[..., LRScheduler] | None = None,
        compile: bool = False,
        speed: str | None = None,
    ) -> None:
        super().__init__()
        if compile:
            model.compile()  # in place, so checkpoints keep the plain parameter names
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_function = loss_function
        self.speed = speed
        self.train_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_confusion = MulticlassConfusionMatrix(num_classes=10)

    def forward(self, x: Tensor) -> Tensor:
        # Under trainer.precision=bf16-true/16-true/64-true the weights change dtype; the batch,
        # made float32 after transfer, follows them. Mixed precision keeps float32 weights.
        return self.model(x.to(self.dtype))

    def configure_callbacks(self) -> list[pl.Callback]:
        # Only when fitting: testing keeps the fit's callback (and its choice) instead of replacing it.
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        return [MeasuredSpeed()] if self.speed == "auto" and fitting else []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss_function(logits, y)
        self.train_acc.update(logits, y)
        # on_epoch: Lightning keeps the epoch's mean (train/loss_epoch) on the device, with no host sync.
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        if batch_idx % self.trainer.log_every_n_steps == 0:
            self.stop_if_diverged(loss)
        return loss

    def on_train_epoch_end(self) -> None:
        mean = self.trainer.callback_metrics.get("train/loss_epoch")  # reduced over ranks: the same on each
        if mean is not None:
            self.stop_if_diverged(mean)

    def stop_if_diverged(self, loss: Tensor) -> None:
        """Every rank stops together: the decision is reduced over ranks, so no rank raises alone
        while the others wait in an all-reduce. Checked every `log_every_n_steps` batches, since
        reading the loss on the host waits for the device."""
        diverged = not bool(loss.detach().isfinite())
        if self.trainer.strategy.reduce_boolean_decision(diverged, all=False):
            lr = getattr(self.optimizer, "keywords", {}).get("lr")
            raise Diverged(
                f"the training loss became nan or inf by step {self.global_step}"
                + (f" with task.optimizer.lr={lr}" if lr is not None else "")
                + ", so the learning rate is likely too high (or a batch holds bad values)"
            )

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        logits = self._evaluate(batch, "test", self.test_acc)
        self.test_confusion.update(logits, batch[1])

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        accuracy.update(logits, y)
        # The loss is a plain tensor, averaged over ranks only when asked; the accuracy, a
        # torchmetrics Metric, sums its counts over ranks itself.
        self.log(f"{stage}/loss", self.loss_function(logits, y), prog_bar=True, sync_dist=True)
        self.log(f"{stage}/acc", accuracy, prog_bar=True)
        return logits

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
