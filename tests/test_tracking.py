"""logger=mlflow and logger=wandb end to end (with callbacks=default, whose TrackedFiles gives them the
config, the best checkpoint and the figures), their stores in tmp folders; they need
requirements-tracking.txt. Command-line runs: the config they log is the one Hydra writes."""

import importlib.util
from pathlib import Path

import pytest
from conftest import OFFLINE, TINY_RUN, compose_config, run_train

from mnist_extras.checks import check_targets
from mnist_extras.errors import ConfigError


def test_a_tracking_logger_without_its_package_stops_with_the_install_command(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name, *a))

    with pytest.raises(ConfigError) as stop:
        check_targets(compose_config("logger=mlflow"))

    assert str(stop.value) == (
        "logger.mlflow._target_=pytorch_lightning.loggers.MLFlowLogger: needs the mlflow package, which is not "
        "installed; fix: pip install -r requirements-tracking.txt"
    )


def mlflow_args(store: Path) -> list[str]:
    """logger=mlflow with its database and artifacts in `store` instead of the project folder."""
    return [
        "callbacks=default",
        "logger=mlflow",
        f"logger.mlflow.tracking_uri=sqlite:///{store / 'mlflow.db'}",
        f"logger.mlflow.artifact_location={store / 'mlartifacts'}",
    ]


def mlflow_client(store: Path):
    from mlflow.tracking import MlflowClient  # the tests skip without it, as they start

    return MlflowClient(f"sqlite:///{store / 'mlflow.db'}")


@pytest.mark.slow
def test_an_mlflow_sweep_is_one_experiment_whose_runs_have_the_config_metrics_checkpoint_and_figures(
    tmp_path, mnist_dir
):
    pytest.importorskip("mlflow", reason="pip install -r requirements-tracking.txt")
    sweep_dir = tmp_path / "lr_sweep"
    result = run_train(
        "-m",
        "task.optimizer.lr=0.001,0.002",
        *TINY_RUN,
        *mlflow_args(tmp_path),
        "trainer.log_every_n_steps=1",
        f"data_module.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr

    client = mlflow_client(tmp_path)
    experiments = [e for e in client.search_experiments() if e.name != "Default"]
    assert [e.name for e in experiments] == [str(sweep_dir)]  # named after the folder above the runs
    runs = client.search_runs([experiments[0].experiment_id])
    named = sorted((run.info.run_name, run.data.params["task/optimizer/lr"]) for run in runs)
    assert named == [("0", "0.001"), ("1", "0.002")]
    [run] = [run for run in runs if run.info.run_name == "1"]
    run_dir = sweep_dir / "1"
    assert run.info.status == "FINISHED"
    assert run.data.tags["run_dir"] == str(run_dir)
    params = run.data.params
    assert params["task/model/backbone/_target_"] == "backbones.ResNet18"
    assert params["trainer/max_epochs"] == "1"
    assert params["seed"] == "0"
    steps = client.get_metric_history(run.info.run_id, "train/loss_step")
    assert [m.step for m in steps] == [0, 1, 2]  # every step of 3 training batches
    assert [m.value for m in client.get_metric_history(run.info.run_id, "epoch")][-1] >= 0
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 1  # once an epoch
    assert {"test/acc", "train/loss_epoch"} <= set(run.data.metrics)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert {"learning_curve.png", "confusion_matrix.png", "checkpoints"} <= set(artifacts)
    [checkpoint] = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert checkpoint == f"checkpoints/{next((run_dir / 'checkpoints').glob('epoch*.ckpt')).name}"  # the best


@pytest.mark.slow
def test_wandb_run_is_offline_in_the_run_folder(tmp_path, mnist_dir):
    pytest.importorskip("wandb", reason="pip install -r requirements-tracking.txt")
    run_dir = tmp_path / "run"
    home = tmp_path / "wandb-home"  # where W&B would write under ~ (settings, cache, logs)
    env = {
        **OFFLINE,  # a network call would fail
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_DATA_DIR": str(home / "data"),
    }
    args = [
        *TINY_RUN,
        "callbacks=default",
        "logger=wandb",
        f"data_module.data_dir={mnist_dir}",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_train(*args, env=env)
    assert result.returncode == 0, result.stderr

    [offline_run] = (run_dir / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("run-*.wandb"))
    figures = sorted(p.name.split("_")[0] for p in (offline_run / "files" / "media" / "images").glob("*.png"))
    assert figures == ["confusion", "learning"]
    assert f"wandb sync {offline_run}" in result.stdout + result.stderr
    logs = "".join(p.read_text(errors="replace") for p in [*run_dir.rglob("*.log"), *home.rglob("*.log")])
    assert "api.wandb.ai" not in logs


def test_the_tracking_loggers_name_runs_by_their_folders(tmp_path, monkeypatch):
    """configs/logger/{mlflow,wandb}.yaml group runs by the folder above the run (one experiment a
    sweep) and name them by the run folder: the resolvers mnist_extras.errors registers."""
    from omegaconf import OmegaConf

    import mnist_extras.errors  # noqa: F401  registers run_group and run_name

    monkeypatch.chdir(tmp_path)
    cfg = OmegaConf.create(
        {
            "dir": str(tmp_path / "multirun" / "sweep" / "3"),
            "group": "${run_group:${dir}}",
            "name": "${run_name:${dir}}",
        }
    )
    assert (cfg.group, cfg.name) == ("multirun/sweep", "3")


def test_progress_lines_say_step_images_per_second_and_time_left_where_output_is_no_terminal(caplog):
    from types import SimpleNamespace

    import torch

    from mnist_extras.tracking import ProgressLines

    progress = ProgressLines(every_s=0.0)
    progress.enabled = True  # as when stdout is a file or a pipe
    trainer = SimpleNamespace(global_step=0, world_size=1, estimated_stepping_batches=100)
    progress.on_train_start(trainer, None)
    trainer.global_step = 10
    with caplog.at_level("INFO"):
        progress.on_train_batch_end(trainer, None, None, (torch.zeros(64, 1, 28, 28), torch.zeros(64)), 9)
    [line] = caplog.messages
    assert line.startswith("step 10/100, ")
    assert " images/s, " in line
    assert line.endswith(" left")


def test_accuracy_axes_are_scaled_to_the_data():
    from mnist_extras.plots import accuracy_limits

    low, high = accuracy_limits([0.989, 0.994])
    assert 0.98 < low < 0.989
    assert 0.994 < high <= 1.01
    assert accuracy_limits([]) == (0.0, 1.0)


def test_the_learning_curve_reads_the_loss_only_on_logged_steps():
    """Reading callback_metrics waits for the device; Lightning itself reads it on logged steps only."""
    import torch

    from mnist_extras.plots import LearningCurve

    class Trainer:
        log_every_n_steps, global_step, reads = 5, 0, 0

        @property
        def callback_metrics(self):
            self.reads += 1
            return {"train/loss_step": torch.tensor(1.0)}

    trainer, curve = Trainer(), LearningCurve("unused.png")
    for step in range(1, 11):
        trainer.global_step = step
        curve.on_train_batch_end(trainer, None)
    assert trainer.reads == 2
    assert curve.steps == [(5, 1.0), (10, 1.0)]
