"""Files for MLflow and W&B, loggers whose continued runs keep their earlier steps, progress lines in logs."""

import csv
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only

from mnist_extras.plots import ConfusionMatrixPlot, LearningCurve


class TrackedFiles(pl.Callback):
    """The run's config to every logger; at teardown (the files are written) the best checkpoint and figures to
    MLflow and W&B. Not Lightning's `log_model`: it sends the last-saving callback's files (last.ckpt)."""

    def __init__(self, run_dir: str | Path | None = None) -> None:
        self.config_file = Path(run_dir) / ".hydra" / "config.yaml" if run_dir else None
        self.sent: set[tuple[Path, int]] = set()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.config_file and self.config_file.is_file():  # not when train(cfg) is called outside a Hydra job
            config = OmegaConf.to_container(OmegaConf.load(self.config_file), resolve=True)
            for logger in trainer.loggers:
                logger.log_hyperparams({**config, "seed": config.get("seed", 0)})

    @rank_zero_only
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        files = [Path(best)] if best else []  # none under fast_dev_run
        files += [cb.path for cb in trainer.callbacks if isinstance(cb, LearningCurve | ConfusionMatrixPlot)]
        for path in [path for path in files if path.is_file() and (path, path.stat().st_mtime_ns) not in self.sent]:
            self.sent.add((path, path.stat().st_mtime_ns))  # each version once: teardown comes after fit and test
            folder = "checkpoints" if path.suffix == ".ckpt" else None
            for logger in trainer.loggers:
                if isinstance(logger, MLFlowLogger):
                    logger.experiment.log_artifact(logger.run_id, str(path), folder)
                elif isinstance(logger, WandbLogger) and path.suffix == ".png":
                    logger.log_image(key=path.stem, images=[str(path)])


def continued_step(ckpt_path: str | None) -> int | None:
    """The global step of the checkpoint a run continues (None for a fresh run): later steps come again."""
    if ckpt_path and Path(ckpt_path).is_file():
        return int(torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=True)["global_step"])
    return None


class ContinuedCSVLogger(CSVLogger):
    """Lightning's CSVLogger, keeping a continued run's rows from before its checkpoint: its writer deletes an
    old metrics.csv when it starts, so they are read first and logged again once it has started."""

    def __init__(self, save_dir: str, ckpt_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(save_dir, **{"name": "", "version": "", **kwargs})
        self.kept: list[dict[str, str]] = []
        step, metrics_file = continued_step(ckpt_path), Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if step is not None and metrics_file.is_file():
            with metrics_file.open(newline="") as f:
                self.kept = [row for row in csv.DictReader(f) if int(row["step"]) < step]

    @property
    def experiment(self) -> ExperimentWriter:
        with warnings.catch_warnings():  # the run folder always holds Hydra's files: Lightning would always warn
            warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
            writer = super().experiment
        rows, self.kept = self.kept, []
        for row in rows:  # epoch and step as ints, as Lightning logged them
            step = int(row.pop("step"))
            writer.log_metrics({k: int(v) if v.isdigit() else float(v) for k, v in row.items() if v != ""}, step)
        return writer


class ContinuedTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger, purging the events after the continued checkpoint's step (logged again)."""

    def __init__(self, save_dir: str, ckpt_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(save_dir, purge_step=continued_step(ckpt_path), **kwargs)


class ProgressLines(pl.Callback):
    """Step, images/s and time left every `every_s` seconds when stdout is no terminal (a bar shows nothing)."""

    def __init__(self, every_s: float = 30.0) -> None:
        self.every_s = every_s
        self.enabled = not sys.stdout.isatty()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.since, self.since_step, self.images = time.monotonic(), trainer.global_step, 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.images += len(batch[0] if isinstance(batch, list | tuple) else batch) * trainer.world_size
        elapsed = time.monotonic() - self.since
        if not self.enabled or elapsed < self.every_s:
            return
        total, step = trainer.estimated_stepping_batches, trainer.global_step
        rate = (step - self.since_step) / elapsed
        left = (total - step) / rate if rate > 0 and total != float("inf") else None
        shown = "" if left is None else f", {left:.0f} s left" if left < 120 else f", {left / 60:.0f} min left"
        rank_zero_info(f"step {step}/{total}, {self.images / elapsed:.0f} images/s{shown}")
        self.since, self.since_step, self.images = time.monotonic(), step, 0
