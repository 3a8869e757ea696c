"""The debug presets (configs/debug/): what each one composes, and what its run leaves behind.
They are core: they name nothing from mnist_extras/, so a copy of the spec's project runs them."""

import csv
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import compose_config, run_here, run_train
from omegaconf import OmegaConf
from test_workflows import train_here
from torch import nn
from torch.utils.data import TensorDataset

from data_modules import MEAN, STD, MNISTDataModule
from train import CONFIG_DIR

PRESETS = ["fdr", "limit", "overfit", "profiler"]
# How every preset is meant to be run on a machine without a GPU or internet; small batches for 2 cores.
CPU = ("trainer=cpu", "task.model.backbone.pretrained=false", "data_module.batch_size=32")


def metric_rows(run_dir: Path, name: str) -> list[dict[str, str]]:
    """The rows of the run's metrics.csv that hold `name`."""
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [row for row in csv.DictReader(f) if row.get(name)]


def run_preset(name: str, run_dir: Path, data_dir: Path, *more: str) -> dict[str, float]:
    """The preset's run in this process, with no callbacks or logger option: train.py's own
    checkpoint callback and CSV logger, as in a copy of the project without mnist_extras/."""
    return train_here(run_dir, f"debug={name}", f"data_module.data_dir={data_dir}", *more, base=CPU)


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_writes_at_the_root_on_top_of_the_shared_defaults_and_the_spec_config(name):
    """`# @package _global_` is read: the file's keys land on trainer/task/data_module, not under
    `debug`, over debug/default.yaml's, and nothing else changes. The header says how to run it."""
    path = CONFIG_DIR / "debug" / f"{name}.yaml"
    preset = OmegaConf.load(path)
    composed = compose_config(f"debug={name}")
    assert "debug" not in composed
    assert list(preset.pop("defaults")) == ["default"]
    spec = OmegaConf.to_container(compose_config())
    shared = OmegaConf.load(CONFIG_DIR / "debug" / "default.yaml")
    assert OmegaConf.to_container(composed) == OmegaConf.to_container(OmegaConf.merge(spec, shared, preset))
    assert path.read_text().splitlines()[0] == "# @package _global_"
    assert f"python train.py debug={name} trainer=cpu task.model.backbone.pretrained=false" in path.read_text()
    assert composed.data_module.num_workers == 0


def test_the_presets_name_nothing_from_the_extras_and_no_augmentation():
    for path in (CONFIG_DIR / "debug").glob("*.yaml"):
        text = path.read_text()
        assert "mnist_extras" not in text, path
        assert "hydra_plugins" not in text, path
        assert "augment" not in OmegaConf.to_container(OmegaConf.load(path)).get("data_module", {}), path


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


OVERFIT_UNSHUFFLES = "ignore:You requested to overfit but enabled train dataloader shuffling"  # what we rely on


@pytest.mark.filterwarnings("ignore::lightning_fabric.utilities.warnings.PossibleUserWarning", OVERFIT_UNSHUFFLES)
def test_overfit_batches_trains_on_the_same_first_batches_every_epoch(tmp_path, monkeypatch):
    """debug=overfit relies on Lightning turning the shuffled training loader into a fixed one."""
    data = MNISTDataModule(data_dir=tmp_path, batch_size=8)
    count = 64
    images = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 1, 28, 28).clone()
    data.train_set = data.val_set = data.test_set = TensorDataset(images, torch.arange(count) % 10)
    monkeypatch.setattr(data, "prepare_data", lambda: None)
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


def test_the_checks_build_a_profiled_trainer_before_a_run(tmp_path, capsys, monkeypatch):
    """The profiler's `${hydra:runtime.output_dir}` names a folder Hydra sets only when the job starts:
    the checks build the trainer without that key, and the bad precision is what they report."""
    args = ["debug=profiler", *CPU, "+trainer.precision=bf17", f"hydra.run.dir={tmp_path / 'run'}"]
    assert run_here("train.py", *args, monkeypatch=monkeypatch) == 2
    stderr = capsys.readouterr().err
    assert "bf17" in stderr
    assert "HydraConfig" not in stderr


@pytest.mark.slow
def test_fdr_runs_one_batch_of_each_stage_and_completes_without_checkpoints(tmp_path, mnist_dir):
    """The command line, for what the Hydra callbacks write: run.json and train.log."""
    run_dir = tmp_path / "fdr"
    result = run_train("debug=fdr", *CPU, f"data_module.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}")

    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert "test accuracy: " in result.stdout
    assert "(last weights)" in result.stdout + result.stderr  # no checkpoint to test: the weights after the one step
    # No best checkpoint; Lightning 2.6's save_last still writes last.ckpt as fitting ends.
    assert [path.name for path in run_dir.rglob("*.ckpt")] in ([], ["last.ckpt"])
    assert not (run_dir / "metrics.csv").exists()  # fast_dev_run swaps the loggers for a dummy
    log = (run_dir / "train.log").read_text()
    assert "Running in `fast_dev_run` mode: will run the requested loop using 1 batch(es)" in log


def test_limit_runs_three_short_epochs_with_checkpoints_and_metrics(tmp_path, mnist_dir):
    run_dir = tmp_path / "limit"
    metrics = run_preset(
        "limit",
        run_dir,
        mnist_dir,
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
    )

    assert 0 <= metrics["test/acc"] <= 1
    steps = metric_rows(run_dir, "train/loss_step")
    assert [int(row["step"]) for row in steps] == list(range(6))  # 2 batches x 3 epochs, each logged
    assert [int(row["epoch"]) for row in metric_rows(run_dir, "val/acc")] == [0, 1, 2]
    assert len(metric_rows(run_dir, "test/acc")) == 1
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints
    assert len(checkpoints) == 2  # and the best by val/acc


@pytest.mark.slow
@pytest.mark.filterwarnings(OVERFIT_UNSHUFFLES)
def test_overfit_reaches_full_training_accuracy(tmp_path, mnist_dir):
    """Half the preset's epochs: with this seed train/acc is 1.0 from epoch 3 on (measured)."""
    run_dir = tmp_path / "overfit"
    metrics = run_preset("overfit", run_dir, mnist_dir, "+seed=0", "trainer.max_epochs=5")

    accuracy = [float(row["train/acc"]) for row in metric_rows(run_dir, "train/acc")]
    assert len(accuracy) == 5
    assert accuracy[-1] == 1.0, accuracy  # memorised, and kept
    assert 0 <= metrics["test/acc"] <= 1
    assert float(metric_rows(run_dir, "train/loss_epoch")[-1]["train/loss_epoch"]) < 0.05
    assert len(metric_rows(run_dir, "train/loss_step")) == 15  # 3 batches an epoch


def test_profiler_writes_its_reports_into_the_run_folder(tmp_path, mnist_dir):
    run_dir = tmp_path / "profiler"
    fewer = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    run_preset("profiler", run_dir, mnist_dir, *fewer)

    fit, test = (run_dir / "fit-profile.txt").read_text(), (run_dir / "test-profile.txt").read_text()
    assert "FIT Profiler Report" in fit
    assert "TEST Profiler Report" in test
    assert profiled_calls(fit, "run_training_batch") == 2
    assert profiled_calls(test, "[Strategy]SingleDeviceStrategy.test_step") == 1


def profiled_calls(report: str, action: str) -> int:
    """The `Num calls` column of `action`'s row in a SimpleProfiler report."""
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == action:
            return int(cells[2])
    raise AssertionError(f"{action} is not in the report")
