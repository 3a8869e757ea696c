"""What only the fit knows, added to run.json: the parameter count, the fit's seconds, and why early stopping
ended it. records.RunRecord (a Hydra callback) keeps these when the job ends."""

import time

import pytorch_lightning as pl

from mnist_extras.records import read_record, write_record


class FitRecord(pl.Callback):
    def __init__(self, run_dir: str) -> None:
        self.run_dir, self.started = run_dir, 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or (record := read_record(self.run_dir)) is None:
            return
        stopped = next(filter(None, (cb.stopping_reason_message for cb in trainer.early_stopping_callbacks)), None)
        record["metrics"] = {**record.get("metrics", {}), "fit_seconds": time.perf_counter() - self.started}
        record.update(params=sum(p.numel() for p in pl_module.parameters()), stopped=stopped)
        write_record(self.run_dir, record)
