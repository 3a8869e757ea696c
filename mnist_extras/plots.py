"""The learning curve and the test confusion matrix as PNG files in the run folder, and the
accuracy axis limits that sweeps.py's comparison.png shares."""

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl


class LearningCurve(pl.Callback):
    """Draws `learning_curve.png` when fitting ends: each epoch's train/val loss and accuracy, and the
    training loss at every logged step (what a one-epoch run has to show).

    The rows travel in checkpoints, so a continued run's curve is whole.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.epochs: list[dict[str, float]] = []
        self.steps: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Only on the steps Lightning logs (and so reads on the host anyway): reading
        # callback_metrics on other steps would wait for the device once more per batch.
        if trainer.global_step % trainer.log_every_n_steps:
            return
        loss = trainer.callback_metrics.get("train/loss_step")
        if loss is not None:
            self.steps.append((trainer.global_step, float(loss)))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        row = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step}
        for name, value in trainer.callback_metrics.items():
            if not name.endswith("_step") and name.split("/")[0] in ("train", "val"):
                row[name.removesuffix("_epoch")] = float(value)
        self.epochs.append(row)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.epochs:
            save_learning_curve(self.epochs, self.steps, self.path)

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = list(state_dict["epochs"])
        self.steps = [tuple(point) for point in state_dict.get("steps", [])]


class ConfusionMatrixPlot(pl.Callback):
    """Draws the task's test confusion matrix (a torchmetrics metric updated in `test_step`) to `path`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        matrix = pl_module.test_confusion  # compute() gathers every rank's counts: all ranks call it
        counts = matrix.compute()
        if trainer.is_global_zero:
            save_confusion_matrix(counts, self.path)
        matrix.reset()


def save_confusion_matrix(counts: Any, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend, no window, nothing to close

    counts = counts.cpu().numpy()
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    ax.imshow(counts, cmap="Blues")
    high = counts.max() / 2 if counts.size else 0
    for (row, col), value in np.ndenumerate(counts):
        ax.text(col, row, str(value), ha="center", va="center", fontsize=7, color="white" if value > high else "black")
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_title(f"Confusion matrix (test set, {int(counts.sum())} images)")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def save_learning_curve(epochs: list[dict[str, float]], steps: list[tuple[int, float]], path: Path) -> None:
    """Loss and accuracy against training steps: per logged step for the training loss, at each
    epoch's end for the epoch values (marked and labelled by epoch)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    loss_ax, acc_ax = fig.subplots(1, 2, sharex=True)
    if len(steps) > 1:
        loss_ax.plot(*zip(*steps, strict=True), color="tab:blue", alpha=0.35, label="train (logged steps)")
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "acc")):
        for stage, color in (("train", "tab:blue"), ("val", "tab:orange")):
            points = [(row["step"], row[f"{stage}/{metric}"]) for row in epochs if f"{stage}/{metric}" in row]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=color, label=f"{stage} (epoch)")
        ax.set_xlabel("training step")
        ax.set_ylabel("accuracy" if metric == "acc" else "loss")
        ax.legend()
        ax.grid(alpha=0.3)
    accuracies = [row[name] for row in epochs for name in ("train/acc", "val/acc") if name in row]
    if accuracies:
        acc_ax.set_ylim(*accuracy_limits(accuracies))
    for row in epochs:
        acc_ax.annotate(f"epoch {row['epoch']}", (row["step"], acc_ax.get_ylim()[0]), fontsize=7, ha="right")
    fig.suptitle(f"Learning curve ({len(epochs)} epoch{'s' if len(epochs) != 1 else ''})")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def accuracy_limits(values: list[float], errors: list[float] = ()) -> tuple[float, float]:
    """Y limits for accuracies, scaled to the data: runs at 98.9% and 99.4% must look different,
    which on a 0-1 axis they do not. A margin of a tenth of the spread (at least 0.002) each
    side, and room above for the legend; never below 0 or above 1 plus that room."""
    values = [float(v) for v in values if v is not None and v == v]
    if not values:
        return 0.0, 1.0
    errors = list(errors) + [0.0] * (len(values) - len(errors))
    low = min(v - e for v, e in zip(values, errors, strict=False))
    high = max(v + e for v, e in zip(values, errors, strict=False))
    margin = max((high - low) * 0.1, 0.002)
    return max(0.0, low - margin), min(1.0, high) + 2.5 * margin
