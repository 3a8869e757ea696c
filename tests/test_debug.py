"""The debug presets (configs/debug/): what each one composes, and what its run leaves behind."""

import csv
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import compose_config, run_train
from omegaconf import OmegaConf
from torch import nn

from mnist_extras.errors import CONFIG_DIR
from data_modules import MEAN, STD, InMemoryDigits, MNISTDataModule

PRESETS = ["fdr", "limit", "overfit", "profiler"]
# How every preset is meant to be run on a machine without a GPU or internet; small batches for 2 cores.
CPU = ["trainer=cpu", "task.model.backbone.pretrained=false", "data_module.batch_size=32"]


def run_preset(name: str, run_dir: Path, data_dir: Path, *more: str):
    return run_train(f"debug={name}", *CPU, f"data_module.data_dir={data_dir}", f"hydra.run.dir={run_dir}", *more)


def run_record(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def metric_rows(run_dir: Path, name: str) -> list[dict[str, str]]:
    """The rows of the run's metrics.csv that hold `name`."""
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [row for row in csv.DictReader(f) if row.get(name)]


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_writes_at_the_root_on_top_of_the_spec_config(name):
    """`# @package _global_` is read: the file's keys land on trainer/task/data_module, not under
    `debug`, and nothing else changes. The header says how to run it."""
    path = CONFIG_DIR / "debug" / f"{name}.yaml"
    preset = OmegaConf.load(path)
    composed = compose_config(f"debug={name}")
    assert "debug" not in composed
    spec = OmegaConf.to_container(compose_config())
    assert OmegaConf.to_container(composed) == OmegaConf.to_container(OmegaConf.merge(spec, preset))
    assert path.read_text().splitlines()[0] == "# @package _global_"
    assert f"python train.py debug={name} trainer=cpu task.model.backbone.pretrained=false" in path.read_text()


def test_cfg_job_with_debug_fdr_shows_fast_dev_run_under_trainer():
    result = run_train("--cfg", "job", "debug=fdr")
    assert result.returncode == 0, result.stderr
    trainer = yaml.safe_load(result.stdout)["trainer"]
    assert trainer["fast_dev_run"] is True
    assert trainer["detect_anomaly"] is True


class BatchRecorder(pl.LightningModule):
    """Records which samples each training batch held: sample i is an image filled with the value i."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(28 * 28, 10)
        self.epochs: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        if batch_idx == 0:
            self.epochs.append([])
        self.epochs[-1] += (images[:, 0, 0, 0] * STD * 255 + MEAN * 255).round().long().tolist()
        return nn.functional.cross_entropy(self.layer(images.flatten(1)), labels)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.filterwarnings("ignore::lightning_fabric.utilities.warnings.PossibleUserWarning")
def test_overfit_batches_trains_on_the_same_first_batches_every_epoch(tmp_path, monkeypatch):
    """Lightning's own check misses the data module's batch sampler; without the data module's
    part, each epoch would draw 2 fresh random batches and debug=overfit would overfit nothing."""
    data = MNISTDataModule(data_dir=tmp_path, batch_size=8)
    count = 64
    data.train_set = data.val_set = InMemoryDigits(
        torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 1, 28, 28).clone(),
        torch.arange(count) % 10,
    )
    monkeypatch.setattr(data, "prepare_data", lambda: None)
    monkeypatch.setattr(data, "setup", lambda stage=None: None)
    module = BatchRecorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        overfit_batches=2,
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    assert module.epochs == [list(range(16))] * 3


def test_the_checks_build_a_profiled_trainer_before_a_run(tmp_path):
    """The profiler's `${hydra:runtime.output_dir}` names a folder Hydra sets only when the job starts:
    the checks build the trainer without that key, and the bad precision is what they report."""
    result = run_train("debug=profiler", *CPU, "+trainer.precision=bf17", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr
    assert "bf17" in result.stderr
    assert "HydraConfig" not in result.stderr


def test_the_checks_build_a_profiled_trainer_before_a_sweep(tmp_path):
    result = run_train(
        "-m", "debug=profiler", *CPU, "+trainer.precision=32-true,bf17", f"hydra.sweep.dir={tmp_path / 'sweep'}"
    )
    assert result.returncode == 2, result.stderr
    assert "bf17" in result.stderr
    assert "HydraConfig" not in result.stderr
    assert not (tmp_path / "sweep" / "0").exists()  # stopped before the first job


@pytest.mark.slow
def test_fdr_runs_one_batch_of_each_stage_and_completes_without_checkpoints(tmp_path, mnist_dir):
    run_dir = tmp_path / "fdr"
    result = run_preset("fdr", run_dir, mnist_dir)

    assert result.returncode == 0, result.stderr
    record = run_record(run_dir)
    assert record["status"] == "completed"
    assert record["epochs"] == 1
    assert {"train/loss", "val/acc", "test/acc"} <= record["metrics"].keys()
    assert "(last weights;" in result.stdout  # no checkpoint to test: the weights after the one step
    assert not list(run_dir.rglob("*.ckpt"))
    assert not (run_dir / "metrics.csv").exists()  # fast_dev_run swaps the loggers for a dummy
    log = (run_dir / "train.log").read_text()
    assert "Running in `fast_dev_run` mode: will run the requested loop using 1 batch(es)" in log
    assert "detect_anomaly=True" in log


@pytest.mark.slow
def test_limit_runs_three_short_epochs_with_checkpoints_and_metrics(tmp_path, mnist_dir):
    run_dir = tmp_path / "limit"
    result = run_preset("limit", run_dir, mnist_dir)

    assert result.returncode == 0, result.stderr
    record = run_record(run_dir)
    assert record["status"] == "completed"
    assert record["epochs"] == 3
    steps = metric_rows(run_dir, "train/loss_step")
    assert [int(row["step"]) for row in steps] == list(range(15))  # 5 batches x 3 epochs, each logged
    assert [int(row["epoch"]) for row in metric_rows(run_dir, "val/acc")] == [0, 1, 2]
    assert len(metric_rows(run_dir, "test/acc")) == 1
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints
    assert len(checkpoints) == 2  # and the best by val/acc

    # eval.py tests such a checkpoint on the whole test set: the recorded preset is left out.
    from eval import eval_command_line

    args = eval_command_line([f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"])
    assert "trainer=cpu" in args
    assert not [arg for arg in args if arg.startswith("debug=")]


@pytest.mark.slow
def test_overfit_reaches_full_training_accuracy(tmp_path, mnist_dir):
    """Half the preset's epochs: with this seed train/acc is 1.0 from epoch 3 on (measured)."""
    run_dir = tmp_path / "overfit"
    result = run_preset("overfit", run_dir, mnist_dir, "seed=0", "trainer.max_epochs=5")

    assert result.returncode == 0, result.stderr
    record = run_record(run_dir)
    assert record["status"] == "completed"
    assert record["epochs"] == 5
    accuracy = [float(row["train/acc"]) for row in metric_rows(run_dir, "train/acc")]
    assert len(accuracy) == 5
    assert accuracy[-1] == 1.0, accuracy  # memorised, and kept
    assert record["metrics"]["train/acc"] == 1.0
    assert float(metric_rows(run_dir, "train/loss_epoch")[-1]["train/loss_epoch"]) < 0.05
    assert len(metric_rows(run_dir, "train/loss_step")) == 15  # 3 batches an epoch


@pytest.mark.slow
def test_profiler_writes_its_reports_into_the_run_folder(tmp_path, mnist_dir):
    run_dir = tmp_path / "profiler"
    fewer = ["trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"]
    result = run_preset("profiler", run_dir, mnist_dir, *fewer)

    assert result.returncode == 0, result.stderr
    assert run_record(run_dir)["status"] == "completed"
    fit, test = (run_dir / "fit-profile.txt").read_text(), (run_dir / "test-profile.txt").read_text()
    assert "FIT Profiler Report" in fit
    assert "TEST Profiler Report" in test
    assert profiled_calls(fit, "run_training_batch") == 4
    assert profiled_calls(test, "[Strategy]SingleDeviceStrategy.test_step") == 2


def profiled_calls(report: str, action: str) -> int:
    """The `Num calls` column of `action`'s row in a SimpleProfiler report."""
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == action:
            return int(cells[2])
    raise AssertionError(f"{action} is not in the report")
