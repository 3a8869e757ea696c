"""Files for the run browsers (MLflow, W&B), and a CSV logger whose continued runs keep their rows."""

import csv
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from mnist_extras.plots import ConfusionMatrixPlot, LearningCurve


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
