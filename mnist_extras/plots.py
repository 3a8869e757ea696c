"""The learning curve and the test confusion matrix as PNG files in the run folder."""

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl


class LearningCurve(pl.Callback):
    """Draws `path` when fitting ends: each epoch's train/val loss and accuracy, and the training loss at each
    logged step (all a one-epoch run has). The rows travel in checkpoints: a continued run's curve is whole."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.epochs: list[dict[str, float]] = []
        self.steps: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Only on the steps Lightning logs (reads on the host anyway): other steps would wait for the device.
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
        if not trainer.is_global_zero or not self.epochs:
            return
        from matplotlib.figure import Figure  # no pyplot: no global backend, no window, nothing to close

        fig = Figure(figsize=(10, 4))
        loss_ax, acc_ax = fig.subplots(1, 2, sharex=True)
        if len(self.steps) > 1:
            loss_ax.plot(*zip(*self.steps, strict=True), color="tab:blue", alpha=0.35, label="train (logged steps)")
        for ax, metric in ((loss_ax, "loss"), (acc_ax, "acc")):
            for stage, color in (("train", "tab:blue"), ("val", "tab:orange")):
                name = f"{stage}/{metric}"
                points = [(row["step"], row[name]) for row in self.epochs if name in row]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", color=color, label=f"{stage} (epoch)")
            ax.set(xlabel="training step", ylabel="accuracy" if metric == "acc" else "loss")
            ax.legend()
            ax.grid(alpha=0.3)
        acc_ax.set_ylim(*accuracy_limits([row[n] for row in self.epochs for n in ("train/acc", "val/acc") if n in row]))
        for row in self.epochs:
            acc_ax.annotate(f"epoch {row['epoch']}", (row["step"], acc_ax.get_ylim()[0]), fontsize=7, ha="right")
        fig.suptitle(f"Learning curve ({len(self.epochs)} epoch{'s' if len(self.epochs) != 1 else ''})")
        fig.savefig(self.path, dpi=120, bbox_inches="tight")

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = list(state_dict["epochs"])
        self.steps = [tuple(point) for point in state_dict.get("steps", [])]


class ConfusionMatrixPlot(pl.Callback):
    """Draws the task's test confusion matrix (updated in `test_step`) to `path`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        matrix = pl_module.test_confusion  # compute() gathers every rank's counts: all ranks call it
        counts = matrix.compute().cpu().numpy()
        if trainer.is_global_zero:
            from matplotlib.figure import Figure

            ax = Figure(figsize=(7, 6)).subplots()
            ax.imshow(counts, cmap="Blues")
            for (row, col), value in np.ndenumerate(counts):
                color = "white" if value > counts.max() / 2 else "black"
                ax.text(col, row, str(value), ha="center", va="center", fontsize=7, color=color)
            ax.set(xticks=range(10), yticks=range(10), xlabel="predicted digit", ylabel="true digit")
            ax.set_title(f"Confusion matrix (test set, {int(counts.sum())} images)")
            ax.figure.savefig(self.path, dpi=120, bbox_inches="tight")
        matrix.reset()


def accuracy_limits(values: list[float]) -> tuple[float, float]:
    """Y limits scaled to the data (98.9% and 99.4% look alike on a 0-1 axis), with room above for the legend."""
    values = [v for v in values if v == v]  # no nan
    if not values:
        return 0.0, 1.0
    margin = max((max(values) - min(values)) * 0.1, 0.002)
    return max(0.0, min(values) - margin), min(1.0, max(values)) + 2.5 * margin
