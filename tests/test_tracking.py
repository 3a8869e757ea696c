"""logger=mlflow and logger=wandb end to end, their stores in tmp folders; they need requirements-tracking.txt."""

import importlib.util
from pathlib import Path

import pytest
from conftest import OFFLINE, TINY_RUN, compose_config, run_train

from mnist_extras.errors import ConfigError
from mnist_extras.checks import check_targets


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
        "logger=mlflow",
        f"logger.mlflow.tracking_uri=sqlite:///{store / 'mlflow.db'}",
        f"logger.mlflow.artifact_location={store / 'mlartifacts'}",
    ]


def mlflow_client(store: Path):
    from mlflow.tracking import MlflowClient  # the tests skip without it, as they start

    return MlflowClient(f"sqlite:///{store / 'mlflow.db'}")


@pytest.mark.slow
def test_mlflow_run_has_the_config_metrics_checkpoint_and_figures(tmp_path, mnist_dir):
    pytest.importorskip("mlflow", reason="pip install -r requirements-tracking.txt")
    run_dir = tmp_path / "runs" / "first"
    result = run_train(
        *TINY_RUN,
        *mlflow_args(tmp_path),
        "trainer.log_every_n_steps=1",
        "task.optimizer.lr=0.002",
        f"data_module.data_dir={mnist_dir}",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr

    client = mlflow_client(tmp_path)
    experiment = client.get_experiment_by_name(str(run_dir.parent))  # named after the folder above the run
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "first"
    assert run.data.tags["run_dir"] == str(run_dir)
    params = run.data.params
    assert params["task/optimizer/lr"] == "0.002"
    assert params["task/model/backbone/_target_"] == "backbones.ResNet18"
    assert params["trainer/max_epochs"] == "1"
    assert "seed" in params
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
def test_mlflow_sweep_is_one_experiment(tmp_path, mnist_dir):
    pytest.importorskip("mlflow", reason="pip install -r requirements-tracking.txt")
    sweep_dir = tmp_path / "lr_sweep"
    result = run_train(
        "-m",
        "task.optimizer.lr=0.001,0.002",
        *TINY_RUN,
        *mlflow_args(tmp_path),
        f"data_module.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr

    client = mlflow_client(tmp_path)
    experiments = [e for e in client.search_experiments() if e.name != "Default"]
    assert [e.name for e in experiments] == [str(sweep_dir)]
    runs = client.search_runs([experiments[0].experiment_id])
    named = sorted((run.info.run_name, run.data.params["task/optimizer/lr"]) for run in runs)
    assert named == [("0", "0.001"), ("1", "0.002")]


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
    args = [*TINY_RUN, "logger=wandb", f"data_module.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}"]
    result = run_train(*args, env=env)
    assert result.returncode == 0, result.stderr

    [offline_run] = (run_dir / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("run-*.wandb"))
    figures = sorted(p.name.split("_")[0] for p in (offline_run / "files" / "media" / "images").glob("*.png"))
    assert figures == ["confusion", "learning"]
    assert f"wandb sync {offline_run}" in result.stdout + result.stderr
    logs = "".join(p.read_text(errors="replace") for p in [*run_dir.rglob("*.log"), *home.rglob("*.log")])
    assert "api.wandb.ai" not in logs
