"""What a run leaves for people to read: the config tree, progress lines, plots, and the sweep summary.

Each run writes `run.json` (its overrides, seed, size, metrics and status) next to its checkpoints;
a sweep's `summary.md`, `summary.csv` and `comparison.png` are built from its jobs' `run.json`.
Hydra imports this module only to run or sweep (building `SweepReport`), never for `--cfg job`,
so it imports torch and Lightning freely.
"""

import atexit
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib
import pytorch_lightning as pl
import torch
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback as HydraCallback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar, RichProgressBar
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from rich.tree import Tree
from torchmetrics.classification import MulticlassConfusionMatrix

# Runs write image files and never open windows. pyplot is imported where a figure is drawn: its
# first import builds a font cache and says so on stderr, which would precede a config error.
matplotlib.use("Agg")

RECORD = "run.json"
SUMMARY_COLUMNS = [
    "job",
    "overrides",
    "params",
    "best val acc",
    "test acc",
    "epochs",
    "wall time (s)",
    "status",
    "error",
]


def read_record(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Replace `run.json` in one step, so a reader never sees half a record."""
    path = Path(run_dir) / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{RECORD}.{os.getpid()}")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, path)


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


def summary_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder of a sweep, in job order; a job that never recorded an end is 'interrupted'."""
    jobs = sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    rows = []
    for job in jobs:
        record = read_record(job) or {}
        metrics = record.get("metrics", {})
        status = record.get("status", "interrupted")
        rows.append(
            {
                "job": int(job.name),
                "overrides": " ".join(record.get("overrides", [])),
                "params": record.get("params", ""),
                "best val acc": _rounded(metrics.get("val/acc_best")),
                "test acc": _rounded(metrics.get("test/acc")),
                "epochs": record.get("epochs", ""),
                "wall time (s)": _rounded(record.get("wall_time_s"), 1),
                "status": "interrupted" if status == "running" else status,
                "error": record.get("error", ""),
            }
        )
    return rows


def _rounded(value: float | None, digits: int = 4) -> float | str:
    return "" if value is None else round(float(value), digits)


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write summary.csv, summary.md and comparison.png into the sweep folder; return the rows."""
    sweep_dir = Path(sweep_dir)
    rows = summary_rows(sweep_dir)
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    for row in rows:
        cells = (str(row[c]).replace("|", "\\|").replace("\n", " ") for c in SUMMARY_COLUMNS)
        lines.append("| " + " | ".join(cells) + " |")
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    save_comparison(rows, sweep_dir / "comparison.png")
    return rows


def save_comparison(rows: list[dict[str, Any]], path: Path) -> None:
    """Bars of best validation and test accuracy, one pair per job."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4.5))
    width = 0.4
    for offset, column in ((-width / 2, "best val acc"), (width / 2, "test acc")):
        heights = [row[column] if row[column] != "" else 0 for row in rows]
        ax.bar([i + offset for i in range(len(rows))], heights, width, label=column)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{row['job']}: {row['overrides'] or '(defaults)'}\n{row['status']}" for row in rows])
    ax.tick_params(axis="x", labelrotation=20, labelsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("Sweep: accuracy per job")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def print_summary(rows: list[dict[str, Any]], sweep_dir: Path) -> None:
    table = Table(title=f"Sweep summary ({sweep_dir}/summary.md)")
    for column in SUMMARY_COLUMNS:
        table.add_column(column, overflow="fold")
    styles = {"completed": "green", "failed": "red", "interrupted": "yellow"}
    for row in rows:
        table.add_row(*(str(row[c]) for c in SUMMARY_COLUMNS), style=styles.get(row["status"]))
    Console().print(table)


class SweepReport(HydraCallback):
    """Keeps a sweep's summary current after every job and prints it when the sweep ends.

    Hydra skips `on_multirun_end` when a job failed (it re-raises the job's error first), so the
    table is printed at exit instead; summary files are rewritten after each job, so they hold
    every job that ran even if the sweep is killed.
    """

    def __init__(self) -> None:
        self.started = 0.0
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        atexit.register(self._report)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.sweep_dir is None:  # a single run: nothing to summarise
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value
            write_record(
                run_dir,
                {
                    **(read_record(run_dir) or {}),
                    "overrides": list(config.hydra.overrides.task),
                    "status": "failed",
                    "error": f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}",
                    "wall_time_s": time.perf_counter() - self.started,
                },
            )
        write_summary(self.sweep_dir)

    def _report(self) -> None:
        if self.sweep_dir is not None and self.sweep_dir.is_dir():
            print_summary(write_summary(self.sweep_dir), self.sweep_dir)


def build_loggers(logger_cfg: DictConfig | None, choice: str | None, save_dir: Path) -> list[pl.loggers.Logger]:
    """The `logger` group's loggers, writing into the run folder; CSV and TensorBoard when none was chosen.

    The default lives here rather than in config.yaml's defaults list, which must keep `--cfg job`
    printing the spec's config.
    """
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    if choice is None:
        return [CSVLogger(save_dir, name="", version=""), TensorBoardLogger(save_dir, name="tensorboard", version="")]
    return [instantiate(node, save_dir=str(save_dir)) for node in (logger_cfg or {}).values()]
