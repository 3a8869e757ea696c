"""Tasks: LightningModules that train a model on a problem."""

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import execution_whitelist, instantiate
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

# What a checkpoint's config may name: the classes this project's configs use. A checkpoint is
# data, and `_target_` can name any callable (`torch.load` with weights_only=false runs a pickle).
PARTS = {
    "backbones.ResNet18",
    "backbones.ResNet34",
    "backbones.ResNet50",
    "adapters.LinearAdapter",
    "heads.IdentityHead",
    "models.SimpleModel",
    "loss_functions.CrossEntropyLoss",
    "torch.optim.Adam",
    "torch.optim.AdamW",
    "torch.optim.lr_scheduler.OneCycleLR",
}


class MNISTClassification(pl.LightningModule):
    """Ten-way digit classification: loss and accuracy under train/, val/ and test/, and val/acc_best.

    `optimizer` and `scheduler` are Hydra `_partial_` objects that `configure_optimizers` completes; the
    scheduler steps every batch. Each part may also be its config (a dict with `_target_`): that is how
    `load_from_checkpoint(path)` rebuilds a task from the hyper-parameters train.py stores.
    """

    def __init__(
        self,
        model: nn.Module | Mapping,
        optimizer: Callable[..., Optimizer] | Mapping,
        loss_function: nn.Module | Mapping,
        scheduler: Callable[..., LRScheduler] | Mapping | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.model = build(model)
        if compile:
            self.model.compile()  # in place, so checkpoints keep the plain parameter names
        self.optimizer = build(optimizer)
        self.scheduler = build(scheduler)
        self.loss_function = build(loss_function)
        self.example_input_array = torch.zeros(2, 1, 28, 28)  # Lightning's summary shows sizes and FLOPs
        self.train_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # in checkpoints, so a resumed run keeps its best
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_confusion = MulticlassConfusionMatrix(num_classes=10)

    def forward(self, x: Tensor) -> Tensor:
        # Under trainer.precision=bf16-true/16-true/64-true the weights change dtype; the batch follows.
        return self.model(x.to(self.dtype))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss_function(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.evaluate(batch, "val", self.val_acc)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:  # the sanity check's two batches are no epoch's accuracy
            self.val_acc_best(self.val_acc.compute())
            self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        logits = self.evaluate(batch, "test", self.test_acc)
        self.test_confusion.update(logits, batch[1])

    def evaluate(self, batch: tuple[Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        accuracy(logits, y)
        # The loss is averaged over ranks when asked; the accuracy, a torchmetrics Metric, sums its counts itself.
        self.log(f"{stage}/loss", self.loss_function(logits, y), prog_bar=True, sync_dist=True)
        self.log(f"{stage}/acc", accuracy, prog_bar=True)
        return logits

    def configure_optimizers(self) -> Optimizer | dict[str, Any]:
        optimizer = self.optimizer(self.parameters())
        if self.scheduler is None:
            return optimizer
        extra = {}
        if "total_steps" in inspect.signature(self.scheduler).parameters:
            extra["total_steps"] = getattr(self.scheduler, "keywords", {}).get("total_steps") or (
                self.trainer.estimated_stepping_batches  # OneCycleLR's length, unless the config gives it
            )
        scheduler = self.scheduler(optimizer, **extra)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def build(part: Any) -> Any:
    """A part as given, or built from its config, whose every `_target_` Hydra checks against PARTS (alone)."""
    if not isinstance(part, Mapping):
        return part
    try:
        return instantiate(part, _execution_whitelist_=execution_whitelist(sorted(PARTS), reset=True))
    except InstantiationException as err:
        if "execution whitelist" not in str(err):
            raise
        refused = str(err).splitlines()[0].removesuffix(".")
        raise UnknownPart(f"{refused}: a checkpoint may name only {', '.join(sorted(PARTS))}") from None


class UnknownPart(ValueError):
    """A config from a checkpoint names a `_target_` that is not one of this project's parts."""
