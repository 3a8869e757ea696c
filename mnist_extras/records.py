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

from mnist_extras.errors import override_key, user_error
from mnist_extras.sweeps import read_record, write_record

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


