"""What a run shows while it trains and leaves to read: the config tree, progress lines, the
learning curve and confusion matrix, and its loggers. Run records and sweep summaries are in
sweeps.py."""

import sys
from pathlib import Path
from typing import Any

import matplotlib
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar, RichProgressBar
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree
from torchmetrics.classification import MulticlassConfusionMatrix

# Runs write image files and never open windows. pyplot is imported where a figure is drawn: its
# first import builds a font cache and says so on stderr, which would precede a config error.
matplotlib.use("Agg")


def config_tree(cfg: DictConfig) -> Tree:
    tree = Tree("config", guide_style="dim")
    for key, node in cfg.items():
        text = OmegaConf.to_yaml(node, resolve=True) if OmegaConf.is_config(node) else str(node)
        tree.add(str(key), style="bold").add(Syntax(text.rstrip(), "yaml", theme="ansi_dark"))
    return tree


def print_config(cfg: DictConfig, run_dir: Path) -> None:
    """Print the composed config once as a tree and keep the same text as `config_tree.txt`."""
    tree = config_tree(cfg)
    Console().print(tree)
    with (Path(run_dir) / "config_tree.txt").open("w") as f:
        Console(file=f, width=120, color_system=None).print(tree)


def progress_bar() -> ProgressBar:
    """A live bar on a terminal; one line per epoch where output goes to a file or a pipe."""
    return RichProgressBar() if sys.stdout.isatty() else EpochLines()


class EpochLines(ProgressBar):
    """Prints `epoch 2/10 train/loss=... val/acc=...` once per epoch, so logs stay readable."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} {metrics_text(trainer)}", flush=True)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            print(f"test {metrics_text(trainer, 'test/')}", flush=True)


def metrics_text(trainer: pl.Trainer, prefix: str = "") -> str:
    metrics = sorted(trainer.callback_metrics.items())
    return " ".join(f"{name}={float(value):.4f}" for name, value in metrics if name.startswith(prefix))


class History(pl.Callback):
    """Per-epoch train/val loss and accuracy, kept in checkpoints so a resumed run's curve is whole.

    The training loss is the mean over the epoch's batches; the task logs only each step's.
    """

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self._losses: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._losses.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        row = {"epoch": trainer.current_epoch + 1}
        if self._losses:
            row["train/loss"] = sum(self._losses) / len(self._losses)
        for name in ("train/acc", "val/loss", "val/acc"):
            if name in trainer.callback_metrics:
                row[name] = float(trainer.callback_metrics[name])
        self.epochs.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = list(state_dict["epochs"])


class ConfusionMatrixPlot(pl.Callback):
    """Saves the test set's confusion matrix to `path` as a PNG when testing ends."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.matrix = MulticlassConfusionMatrix(num_classes=10).to(pl_module.device)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        # The task's test_step returns nothing, so the logits are computed again: testing happens
        # once per run, and the task stays free of plotting.
        images, labels = batch
        with torch.no_grad():
            self.matrix.update(pl_module(images), labels)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import matplotlib.pyplot as plt

        fig, ax = self.matrix.plot(labels=[str(d) for d in range(10)])
        ax.set_title("Confusion matrix (test set)")
        fig.savefig(self.path, dpi=120, bbox_inches="tight")
        plt.close(fig)


def save_learning_curve(epochs: list[dict[str, float]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "acc")):
        for stage in ("train", "val"):
            points = [(row["epoch"], row[f"{stage}/{metric}"]) for row in epochs if f"{stage}/{metric}" in row]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=stage)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if metric == "acc" else "loss")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("Learning curve")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def build_loggers(logger_cfg: DictConfig | None, choice: str | None, save_dir: Path) -> list[pl.loggers.Logger]:
    """The `logger` group's loggers, writing into the run folder; CSV and TensorBoard when none was chosen.

    The default lives here rather than in config.yaml's defaults list, which must keep `--cfg job`
    printing the spec's config.
    """
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    if choice is None:
        return [CSVLogger(save_dir, name="", version=""), TensorBoardLogger(save_dir, name="tensorboard", version="")]
    return [instantiate(node, save_dir=str(save_dir)) for node in (logger_cfg or {}).values()]
