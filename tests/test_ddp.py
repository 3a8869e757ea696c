"""Data-parallel training (trainer=ddp_cpu) and sweeps on Hydra's launcher plugins."""

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RUN, compose_config, run_train
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mnist_extras.errors import quoted
from train import CONFIG_DIR

# TINY_RUN on the 2-process CPU trainer, 16 images a process.
TINY_DDP_RUN = [*(a for a in TINY_RUN if not a.startswith("trainer=")), "trainer=ddp_cpu", "data_module.batch_size=16"]


def test_ddp_cpu_trainer_is_two_gloo_processes():
    trainer = instantiate(compose_config("trainer=ddp_cpu").trainer, logger=False)
    assert trainer.world_size == 2
    assert trainer.strategy.process_group_backend == "gloo"


def test_slurm_launcher_asks_for_one_task_per_gpu():
    with initialize_config_dir(config_dir=str(CONFIG_DIR)):
        cfg = compose(
            config_name="config",
            overrides=["hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.gpus_per_node=8"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (8, 8, 1)
    assert launcher.timeout_min == 240


def rank_lines(run_dir: Path) -> list[str]:
    """What each process's own log says it trained last: `seed N, overrides ...` (a continued run appends)."""
    logs = [run_dir / "train.log", run_dir / "train_ddp_process_1.log"]
    return [
        [line.split(" - ", 1)[1] for line in log.read_text().splitlines() if " - seed " in line][-1] for log in logs
    ]


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, mnist_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """A finished 2-process run of one epoch, without +seed= (both processes take the default)."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    result = run_train(*TINY_DDP_RUN, f"data_module.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir, result


@pytest.mark.slow
def test_two_process_fit_and_test_keep_one_run_directory_and_print_once(ddp_run):
    run_dir, result = ddp_run
    assert "Starting with 2 processes" in result.stdout + result.stderr
    assert result.stdout.count("test accuracy: ") == 1
    assert [p.name for p in run_dir.parent.iterdir()] == ["run"]
    assert "GLOBAL_RANK: 1" in (run_dir / "train_ddp_process_1.log").read_text()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "test/acc" in (run_dir / "metrics.csv").read_text()
    ranks = rank_lines(run_dir)
    assert ranks[0] == ranks[1]  # the same seed and overrides in both processes
    assert ranks[0].startswith(f"seed {record(run_dir)['seed']}, ")


@pytest.mark.slow
def test_a_ddp_run_continues_in_both_processes_and_extends_its_record(ddp_run, mnist_dir, tmp_path):
    source, _ = ddp_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    earlier = record(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    result = run_train(
        *TINY_DDP_RUN,
        f"data_module.data_dir={mnist_dir}",
        f"+ckpt_path={quoted(last)}",
        "trainer.max_epochs=2",
        f"hydra.run.dir={quoted(run_dir)}",
    )
    assert result.returncode == 0, result.stderr
    now = record(run_dir)
    assert (now["status"], now["epochs"], now["seed"]) == ("completed", 2, earlier["seed"])
    assert now["resumed_from"] == [str(last)]
    assert now["wall_time_s"] > earlier["wall_time_s"]
    ranks = rank_lines(run_dir)
    assert ranks[0] == ranks[1]
    assert "ckpt_path=" in ranks[1]


@pytest.mark.slow
def test_eval_of_a_ddp_checkpoint_on_two_processes_covers_the_whole_test_set(ddp_run, tmp_path, mnist_dir):
    run_dir, _ = ddp_run
    result = run_train(
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        "trainer=ddp_cpu",
        f"data_module.data_dir={mnist_dir}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        script="eval.py",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("test accuracy: ") == 1
    assert "on 10000 test images" in result.stdout  # the run's limit_test_batches is not inherited


def job_overrides(job_dir) -> list[str]:
    return yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())


@pytest.mark.slow
def test_a_ddp_sweep_runs_each_job_once_goes_on_past_a_failed_rank_and_resumes(tmp_path, mnist_dir):
    sweep_dir = tmp_path / "sweep"
    args = [
        "-m",
        "hydra/launcher=subprocess",
        "task.loss_function._target_=loss_functions.CrossEntropyLoss,tests.diverging_loss.CrashOnRankOne",
        *TINY_DDP_RUN,
        f"data_module.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    env = {"PYTHONPATH": str(Path(__file__).parent)}
    result = run_train(*args, env=env)

    assert result.returncode != 0
    assert result.stdout.count("#0 : ") == 1  # rank 1 re-running the command line would start the sweep again
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]  # no stray run folders
    job = sweep_dir / "0"
    assert record(job)["status"] == "completed"
    assert "GLOBAL_RANK: 1" in (job / "train_ddp_process_1.log").read_text()
    ranks = rank_lines(job)
    assert ranks[0] == ranks[1]
    assert record(sweep_dir / "1")["status"] == "failed"
    with (sweep_dir / "summary.csv").open() as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["completed", "failed"]

    # Job 0 as SIGTERM leaves it: interrupted, with its last.ckpt; job 1 as if it had completed. Running the
    # sweep again continues the first and skips the second.
    (job / "run.json").write_text(json.dumps({**record(job), "status": "interrupted"}))
    (sweep_dir / "1" / "run.json").write_text(json.dumps({**record(sweep_dir / "1"), "status": "completed"}))
    again = run_train(*args, env=env)
    assert "job 0 continues from" in again.stdout
    assert "job 1 finished before" in again.stdout
    assert record(job)["status"] == "completed"
    assert "ckpt_path=" in rank_lines(job)[1]  # rank 1 continued from the checkpoint too


@pytest.mark.slow
def test_an_optuna_search_on_ddp_trains_its_trial_in_both_processes(tmp_path, mnist_dir):
    sweep_dir = tmp_path / "optuna"
    result = run_train(
        "-m",
        "hparams_search=mnist_optuna_resumable",
        "hydra.sweeper.n_trials=1",
        "++trainer.fast_dev_run=true",
        *TINY_DDP_RUN,
        f"data_module.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr
    assert (sweep_dir / "optimization_results.yaml").is_file()
    ranks = rank_lines(sweep_dir / "0")
    assert ranks[0] == ranks[1]
    assert "task.optimizer.lr=" in ranks[1]
    assert record(sweep_dir / "0")["status"] == "completed"


def test_a_launcher_that_runs_jobs_in_a_pool_refuses_ddp_before_any_job(tmp_path):
    """Hydra's own launcher, which runs them in the sweep's process: tests/test_validation.py."""
    result = run_train("-m", "hydra/launcher=joblib", *TINY_DDP_RUN, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: ")
    assert "hydra/launcher=subprocess" in result.stderr  # what works
    assert not (tmp_path / "sweep" / "0").exists()


@pytest.mark.slow
def test_joblib_runs_a_sweep_in_parallel_worker_processes(tmp_path, mnist_dir):
    sweep_dir = tmp_path / "sweep"
    result = run_train(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "task.optimizer.lr=1e-3,1e-4",
        *TINY_RUN,
        f"data_module.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )

    assert result.returncode == 0, result.stderr
    assert "Joblib.Parallel(n_jobs=2" in result.stdout
    assert "deprecated" not in result.stderr  # the workers quiet library lines too
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]  # no stray run folders
    for job in ("0", "1"):
        assert record(sweep_dir / job)["status"] == "completed"
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
