"""What a run shows while it trains and what it leaves to read: `run.json`, the config tree, epoch
lines, the learning curve and confusion matrix, and metric files that survive a continued run.
Sweep summaries are in sweeps.py."""

import contextlib
import csv
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelSummary, ProgressBar, RichProgressBar
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.model_summary.model_summary import _format_summary_table
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree

from cli import override_key, user_error
from sweeps import read_record, write_record

# Runs write image files and never open windows. pyplot is imported where a figure is drawn: its
# first import builds a font cache and says so on stderr, which would precede a config error.
matplotlib.use("Agg")
log = logging.getLogger(__name__)


class LibraryNoise(logging.Filter):
    """Drops library lines that say nothing about the user's run."""

    NOISE = ("💡 Tip:", "Trainer already configured with model summary")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


def quiet_libraries() -> None:
    """Silence what a user cannot act on, at its source: torch 2.14 deprecates an API that Lightning
    2.6 calls, Lightning advertises a cloud logger when its trainer is built, says it keeps the
    model summary the callbacks group gives it, and doubts its model size under mixed precision
    (where the weights stay 32-bit, so the size it gives is right)."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Precision .*-mixed is not supported by the model summary")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(LibraryNoise())


class RunRecord(pl.Callback):
    """Owns the run's record: `run.json` in the run folder, and the config, overrides and seed in
    every checkpoint (enough for eval.py and predict.py to rebuild the model without the folder).

    `run.json` says `running` from the start, the epochs done after each epoch, and ends as
    `completed` with the metrics, or `failed` / `interrupted` with the reason. A continued run keeps
    what its earlier part recorded. Only rank zero writes.
    """

    def __init__(self, run_dir: Path, cfg: DictConfig, overrides: list[str], seed: int) -> None:
        self.run_dir = Path(run_dir)
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.overrides = [arg for arg in overrides if override_key(arg) != "ckpt_path"]
        self.seed = seed
        # Each process's own log file (not the terminal) says what it trains: DDP ranks must agree.
        logging.getLogger("logfile").info("seed %d, overrides %s", seed, " ".join(overrides))
        self.metrics: dict[str, float] = {}
        self.fit_seconds = 0.0
        self.started = time.perf_counter()
        self.record = read_record(self.run_dir) or {}
        self.earlier_wall_time = self.record.get("wall_time_s", 0.0)
        self.record.update(overrides=self.overrides, seed=seed, status="running")
        self.record.pop("error", None)
        if cfg.get("ckpt_path"):
            self.record["resumed_from"] = [*self.record.get("resumed_from", []), str(cfg.ckpt_path)]
        self.write()

    @rank_zero_only
    def write(self, **changes: Any) -> None:
        self.write_here(**changes)

    def write_here(self, **changes: Any) -> None:
        """Write from this process whatever its rank: a failing rank 1 is the one that knows why."""
        wall_time = self.earlier_wall_time + time.perf_counter() - self.started
        self.record.update(changes, wall_time_s=wall_time)
        try:
            write_record(self.run_dir, self.record)
        except OSError as err:  # a full disk: the run goes on, or ends, with its error on the terminal
            log.warning("could not write %s: %s", self.run_dir / "run.json", err)

    @contextlib.contextmanager
    def failures(self) -> Iterator[None]:
        """Record how the run ended if it did not complete, then let the exception go on."""
        try:
            yield
        except BaseException as err:
            interrupted = isinstance(err, KeyboardInterrupt) or isinstance(err.__context__, KeyboardInterrupt)
            interrupted |= type(err).__name__ == "SIGTERMException"
            if interrupted:
                self.write(status="interrupted", error="Ctrl-C or SIGTERM; continue with ckpt_path=last")
            else:
                first_line = str(err).strip().splitlines()[0] if str(err) else ""
                reason = user_error(err) or f"{type(err).__name__}: {first_line}"
                self.write_here(status="failed", error=reason)
            raise

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_started = time.perf_counter()
        self.record["params"] = sum(p.numel() for p in pl_module.parameters())
        for logger in trainer.loggers:  # MLflow's params, W&B's config, hparams.yaml beside metrics.csv
            logger.log_hyperparams({**self.config, "seed": self.seed})

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(epochs=trainer.current_epoch + 1)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_seconds = time.perf_counter() - self._fit_started
        self.metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        best = getattr(trainer.checkpoint_callback, "best_model_score", None)
        # Without a checkpoint (fast_dev_run) the last validation is the only, so the best, one.
        best = float(best) if best is not None else self.metrics.get("val/acc")
        if best is not None:
            self.metrics["val/acc_best"] = best
        self.metrics["fit_seconds"] = self.fit_seconds
        stopped = [cb.stopping_reason_message for cb in trainer.callbacks if isinstance(cb, EarlyStopping)]
        self.write(epochs=trainer.current_epoch, stopped=next((s for s in stopped if s), None))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The run is complete once testing ends, even if it tested nothing (limit_test_batches=0);
        an exception in testing comes out of `failures()` afterwards and says failed instead."""
        if stage != "test":
            return
        self.metrics.update({name: float(value) for name, value in trainer.callback_metrics.items()})
        self.metrics["objective"] = self.metrics.get("val/acc_best")
        self.write(status="completed", metrics=self.metrics)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint["config"] = self.config
        checkpoint["overrides"] = self.overrides
        checkpoint["seed"] = self.seed


def config_tree(cfg: DictConfig) -> Tree:
    tree = Tree("config", guide_style="dim")
    for key, node in cfg.items():
        text = OmegaConf.to_yaml(node, resolve=True) if OmegaConf.is_config(node) else str(node)
        tree.add(str(key), style="bold").add(Syntax(text.rstrip(), "yaml", theme="ansi_dark"))
    return tree


@rank_zero_only
def print_config(cfg: DictConfig, run_dir: Path) -> None:
    """Print the composed config once as a tree and keep the same text as `config_tree.txt`."""
    tree = config_tree(cfg)
    Console().print(tree)
    with (Path(run_dir) / "config_tree.txt").open("w") as f:
        Console(file=f, width=120, color_system=None).print(tree)


class ParameterSummary(ModelSummary):
    """Lightning's model summary (layers, parameters, size), logged, so train.log has it too, and
    without its FLOPs total, which reads 0 for a model that declares no example input."""

    @staticmethod
    def summarize(
        summary_data: list,
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict,
        total_flops: int,
        **kwargs: Any,
    ) -> None:
        table = _format_summary_table(
            total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, *summary_data
        )
        log.info("\n%s", table.rsplit("\n", 1)[0])  # the last line is the FLOPs total


def progress_bar() -> ProgressBar:
    """A live bar on a terminal; one line per epoch where output goes to a file or a pipe."""
    return EpochBar() if sys.stdout.isatty() else EpochLines()


class EpochBar(RichProgressBar):
    """Lightning's rich bar, counting epochs as the epoch lines do (`Epoch 1/10`, not `Epoch 0/9`),
    and without the sanity check's `val/*` values, which are not an epoch's."""

    def __init__(self) -> None:
        super().__init__()
        self.validated = False

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch + 1)
        return description.replace(f"/{self.trainer.max_epochs - 1}", f"/{self.trainer.max_epochs}")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self.validated |= not trainer.sanity_checking

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        return metrics if self.validated else {k: v for k, v in metrics.items() if not k.startswith("val/")}


class EpochLines(ProgressBar):
    """Logs `epoch 2/10 train/loss=... val/acc=...` once per epoch (terminal and train.log)."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            log.info("epoch %d/%d %s", trainer.current_epoch + 1, trainer.max_epochs, metrics_text(trainer))

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            log.info("test %s", metrics_text(trainer, "test/"))


def metrics_text(trainer: pl.Trainer, prefix: str = "") -> str:
    """Epoch values only: `train/loss` is the epoch's mean (logged as train/loss_epoch), not the last step's."""
    shown = {}
    for name, value in trainer.callback_metrics.items():
        if name.startswith(prefix) and not name.endswith("_step"):
            shown[name.removesuffix("_epoch")] = float(value)
    return " ".join(f"{name}={value:.4f}" for name, value in sorted(shown.items()))


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
        loss = trainer.callback_metrics.get("train/loss_step")
        if loss is not None and trainer.global_step % trainer.log_every_n_steps == 0:
            self.steps.append((trainer.global_step, float(loss)))  # a host sync, once per logged step

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


class TrackedFiles(pl.Callback):
    """Hands the best checkpoint and the figures to the loggers that keep files, as each stage ends:
    MLflow keeps them as the run's artifacts, W&B shows the figures as images; CSV and TensorBoard
    take none. `teardown` comes after every callback's end-of-stage hook, so the files are written.

    Lightning's own `log_model` would give MLflow only last.ckpt: it logs the checkpoints of the
    checkpoint callback that saved last, which here is `last_checkpoint`.
    """

    def __init__(self) -> None:
        self.sent: set[tuple[Path, int]] = set()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        files = [Path(best)] if best else []  # none under fast_dev_run
        files += [cb.path for cb in trainer.callbacks if isinstance(cb, LearningCurve | ConfusionMatrixPlot)]
        for path in files:
            version = (path, path.stat().st_mtime_ns) if path.is_file() else None
            if version is not None and version not in self.sent:
                self.sent.add(version)
                for logger in trainer.loggers:
                    keep_file(logger, path)


def keep_file(logger: Any, path: Path) -> None:
    from pytorch_lightning.loggers import MLFlowLogger, WandbLogger

    if isinstance(logger, MLFlowLogger):
        logger.experiment.log_artifact(logger.run_id, str(path), "checkpoints" if path.suffix == ".ckpt" else None)
    elif isinstance(logger, WandbLogger) and path.suffix == ".png":
        logger.log_image(key=path.stem, images=[str(path)])


def save_confusion_matrix(counts: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    counts = counts.cpu().numpy()
    fig, ax = plt.subplots(figsize=(7, 6))
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
    plt.close(fig)


def save_learning_curve(epochs: list[dict[str, float]], steps: list[tuple[int, float]], path: Path) -> None:
    """Loss and accuracy against training steps: per logged step for the training loss, at each
    epoch's end for the epoch values (marked and labelled by epoch)."""
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
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
    for row in epochs:
        acc_ax.annotate(f"epoch {row['epoch']}", (row["step"], acc_ax.get_ylim()[0]), fontsize=7, ha="right")
    fig.suptitle(f"Learning curve ({len(epochs)} epoch{'s' if len(epochs) != 1 else ''})")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


class ContinuedCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a continued run keeps the rows its earlier part wrote.

    Lightning's writer deletes an existing `metrics.csv` ("Previous log files in this directory will
    be deleted"). This one keeps it, less the rows at or after `purge_step` (the step of the
    checkpoint being continued, as TensorBoard's `purge_step`): those steps are logged again, so
    each appears once.
    """

    def __init__(self, save_dir: str, name: str = "", version: str = "", purge_step: int | None = None) -> None:
        super().__init__(save_dir, name=name, version=version)
        self.purge_step = purge_step

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = KeptRowsWriter(self.log_dir, self.purge_step)
        return self._experiment


class KeptRowsWriter(ExperimentWriter):
    def __init__(self, log_dir: str, purge_step: int | None) -> None:
        self.purge_step = purge_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            self.metrics_keys = list(reader.fieldnames or [])
            rows = [row for row in reader if self.purge_step is None or int(row["step"]) < self.purge_step]
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        with partial.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(partial, path)
