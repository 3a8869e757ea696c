"""Data-parallel training (trainer=ddp_cpu) and sweeps on Hydra's launcher plugins."""

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import TINY_RUN, compose_config, run_train
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning_fabric.utilities.data import _replace_dunder_methods, _set_sampler_epoch
from pytorch_lightning.trainer.states import RunningStage
from torch.utils.data import BatchSampler, DistributedSampler

from data_modules import IndexTensorBatchSampler, InMemoryDigits, MNISTDataModule
from train import CONFIG_DIR

# TINY_RUN on the 2-process CPU trainer, 16 images a process.
TINY_DDP_RUN = [*(a for a in TINY_RUN if not a.startswith("trainer=")), "trainer=ddp_cpu", "data_module.batch_size=16"]


def test_ddp_cpu_trainer_is_two_gloo_processes():
    trainer = instantiate(compose_config("trainer=ddp_cpu").trainer, logger=False)
    assert trainer.world_size == 2
    assert trainer.strategy.process_group_backend == "gloo"


def test_ddp_trainer_takes_every_gpu_in_bf16():
    cfg = compose_config("trainer=ddp", "trainer.num_nodes=2").trainer
    assert (cfg.accelerator, cfg.devices, cfg.num_nodes, cfg.strategy, cfg.precision) == (
        "gpu",
        -1,
        2,
        "ddp",
        "bf16-mixed",
    )


def test_slurm_launcher_asks_for_one_task_per_gpu():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.gpus_per_node=8"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (8, 8, 1)
    assert launcher.timeout_min == 240


def rank_batches(world_size: int, rank: int, epoch: int, size: int = 96) -> list[torch.Tensor]:
    """The training batches one rank sees in one epoch, prepared by Lightning as `fit` does."""
    trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy="ddp", logger=False)
    trainer.strategy.cluster_environment.set_global_rank(rank)
    datamodule = MNISTDataModule(batch_size=8, drop_last=False)
    # Each "label" is the sample's own index, so the batches show which samples a rank saw.
    datamodule.train_set = InMemoryDigits(torch.zeros(size, 1, 28, 28, dtype=torch.uint8), torch.arange(size))
    datamodule.trainer = trainer
    with _replace_dunder_methods(BatchSampler):  # how Lightning calls the hook, to rebuild the sampler later
        loader = datamodule.train_dataloader()
    loader = trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)
    assert isinstance(loader.batch_sampler, IndexTensorBatchSampler)
    assert isinstance(loader.batch_sampler.sampler, DistributedSampler)
    _set_sampler_epoch(loader, epoch)
    return [labels for _, labels in loader]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_out_each_epoch_so_no_sample_is_seen_twice(world_size):
    for epoch in (0, 1):
        seen = [torch.cat(rank_batches(world_size, rank, epoch)) for rank in range(world_size)]
        assert all(len(s) == 96 // world_size for s in seen)
        assert sorted(torch.cat(seen).tolist()) == list(range(96))
    assert not torch.equal(torch.cat(rank_batches(2, 0, 0)), torch.cat(rank_batches(2, 0, 1)))  # reshuffled


@pytest.mark.slow
def test_two_process_fit_and_test_keep_one_run_directory_and_print_once(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    result = run_train(*TINY_DDP_RUN, f"data_module.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}")

    assert result.returncode == 0, result.stderr
    assert "Starting with 2 processes" in result.stdout + result.stderr
    assert result.stdout.count("test accuracy: ") == 1
    assert result.stdout.count("Test metric") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert "GLOBAL_RANK: 1" in (run_dir / "train_ddp_process_1.log").read_text()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "test/acc" in (run_dir / "metrics.csv").read_text()


def job_overrides(job_dir) -> list[str]:
    return yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())


@pytest.mark.slow
def test_ddp_inside_a_multirun_runs_each_job_once_in_its_own_directory(tmp_path, mnist_dir):
    sweep_dir = tmp_path / "sweep"
    result = run_train(
        "-m",
        "task.optimizer.lr=1e-3,1e-4",
        *TINY_DDP_RUN,
        f"data_module.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )

    assert result.returncode == 0, result.stderr
    # Rank 1 re-running the command line would launch the sweep a second time.
    assert result.stdout.count("#0 : ") == 1
    assert result.stdout.count("test accuracy: ") == 2
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]  # no stray run folders
    for job, lr in (("0", "0.001"), ("1", "0.0001")):
        assert f"task.optimizer.lr={lr}" in job_overrides(sweep_dir / job)
        assert "GLOBAL_RANK: 1" in (sweep_dir / job / "train_ddp_process_1.log").read_text()
        assert (sweep_dir / job / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_joblib_runs_a_ddp_sweep_in_parallel_worker_processes(tmp_path, mnist_dir):
    sweep_dir = tmp_path / "sweep"
    result = run_train(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "task.optimizer.lr=1e-3,1e-4",
        *TINY_DDP_RUN,
        f"data_module.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )

    assert result.returncode == 0, result.stderr
    assert "Joblib.Parallel(n_jobs=2" in result.stdout
    assert result.stdout.count("test accuracy: ") == 2
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]  # no stray run folders
    for job in ("0", "1"):
        assert "GLOBAL_RANK: 1" in (sweep_dir / job / "train_ddp_process_1.log").read_text()
        assert (sweep_dir / job / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_submitit_local_runs_a_sweep_as_submitit_jobs(tmp_path, mnist_dir):
    sweep_dir = tmp_path / "sweep"
    result = run_train(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "task.optimizer.lr=1e-3,1e-4",
        *TINY_RUN,
        f"data_module.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )

    assert result.returncode == 0, result.stderr
    assert "Submitit 'local' sweep output dir" in result.stdout
    job_logs = sorted((sweep_dir / ".submitit").glob("*/*_0_log.out"))
    assert len(job_logs) == 2
    assert [log.read_text().count("test accuracy: ") for log in job_logs] == [1, 1]
    for job, lr in (("0", "0.001"), ("1", "0.0001")):
        assert f"task.optimizer.lr={lr}" in job_overrides(sweep_dir / job)
        assert (sweep_dir / job / "checkpoints" / "last.ckpt").is_file()
