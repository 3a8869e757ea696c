"""What a run shows and keeps: files for the run browsers (MLflow, W&B), CSV and TensorBoard loggers
whose continued runs keep their earlier steps, and progress lines where output is not a terminal."""

import csv
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.utilities import rank_zero_info

from mnist_extras.plots import ConfusionMatrixPlot, LearningCurve


class TrackedFiles(pl.Callback):
    """Hands the run's config (as hyper-parameters) to every logger when fitting starts, and the best
    checkpoint and the figures to the loggers that keep files as each stage ends: MLflow keeps them
    as the run's artifacts, W&B shows the figures as images; CSV and TensorBoard take none.
    `teardown` comes after every callback's end-of-stage hook, so the files are written.

    Lightning's own `log_model` would give MLflow only last.ckpt: it logs the checkpoints of the
    checkpoint callback that saved last, which here is `last_checkpoint`. The best checkpoint is
    `trainer.checkpoint_callback`, the first ModelCheckpoint (configs/callbacks/default.yaml).
    """

    def __init__(self, run_dir: str | Path | None = None) -> None:
        self.config_file = Path(run_dir) / ".hydra" / "config.yaml" if run_dir else None
        self.sent: set[tuple[Path, int]] = set()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """MLflow's params, W&B's config, hparams.yaml beside metrics.csv: the config Hydra wrote."""
        if self.config_file is None or not self.config_file.is_file():
            return  # train(cfg) called outside a Hydra job
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(self.config_file), resolve=True)
        for logger in trainer.loggers:
            logger.log_hyperparams({**config, "seed": config.get("seed", 0)})

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


def continued_step(ckpt_path: str | None) -> int | None:
    """The global step of the checkpoint a run continues from (None for a fresh run): the steps
    logged at or after it are logged again, so the loggers drop them."""
    if not ckpt_path or not Path(ckpt_path).is_file():
        return None
    import torch

    return int(torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=True)["global_step"])


class ContinuedCSVLogger(CSVLogger):
    """Lightning's CSVLogger (metrics.csv in `save_dir`), except that a run that continues a
    checkpoint keeps the rows its earlier part wrote before that checkpoint's step.

    Lightning's writer deletes an existing metrics.csv when it starts, which is right for a fresh
    run in a used folder. For a continued run the kept rows are read here, before that, and logged
    again through the writer's public `log_metrics` once Lightning has started its file.
    """

    def __init__(self, save_dir: str, ckpt_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(save_dir, **{"name": "", "version": "", **kwargs})
        self.kept: list[dict[str, str]] = []
        step = continued_step(ckpt_path)
        metrics_file = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if step is not None and metrics_file.is_file():
            with metrics_file.open(newline="") as f:
                self.kept = [row for row in csv.DictReader(f) if int(row["step"]) < step]

    @property
    def experiment(self) -> ExperimentWriter:
        with warnings.catch_warnings():
            # The run folder always holds Hydra's files, so Lightning would warn on every run that
            # it "exists and is not empty"; what it deletes (an old metrics.csv) is kept above if
            # this run continues it.
            warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
            writer = super().experiment
        rows, self.kept = self.kept, []
        for row in rows:
            step = int(row.pop("step"))
            writer.log_metrics({name: number(text) for name, text in row.items() if text != ""}, step)
        return writer


class ContinuedTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger, with TensorBoard's `purge_step` set to the step of the
    checkpoint a run continues from: the events logged after it are hidden, as they are logged again."""

    def __init__(self, save_dir: str, ckpt_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(save_dir, purge_step=continued_step(ckpt_path), **kwargs)


def number(text: str) -> int | float:
    """A metrics.csv cell as Lightning logged it: `epoch` and `step` as ints, metrics as floats."""
    try:
        return int(text)
    except ValueError:
        return float(text)


class ProgressLines(pl.Callback):
    """A line every `every_s` seconds while training (step, images/s, time left) when stdout is not
    a terminal: a progress bar written to a file or a pipe shows nothing until it is flushed, so a
    long run in a batch job would look hung. On a terminal, Lightning's own progress bar shows it.
    Reads only the clock and the batch's shape: no host sync."""

    def __init__(self, every_s: float = 30.0) -> None:
        self.every_s = every_s
        self.enabled = not sys.stdout.isatty()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.since, self.since_step, self.images = time.monotonic(), trainer.global_step, 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled:
            return
        images = batch[0] if isinstance(batch, list | tuple) else batch
        self.images += len(images) * trainer.world_size
        elapsed = time.monotonic() - self.since
        if elapsed < self.every_s:
            return
        total = trainer.estimated_stepping_batches
        steps_per_s = (trainer.global_step - self.since_step) / elapsed
        left = (total - trainer.global_step) / steps_per_s if steps_per_s > 0 and total != float("inf") else None
        rank_zero_info(
            f"step {trainer.global_step}/{total}, {self.images / elapsed:.0f} images/s"
            + ("" if left is None else f", {left:.0f} s left" if left < 120 else f", {left / 60:.0f} min left")
        )
        self.since, self.since_step, self.images = time.monotonic(), trainer.global_step, 0
