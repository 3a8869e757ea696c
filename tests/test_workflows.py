"""End to end: resume, evaluate, predict, sweep report and Optuna search, each on a tiny budget."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN, run_train
from PIL import Image
from torchvision.datasets.mnist import read_image_file

from cli import PROJECT_DIR

pytestmark = pytest.mark.slow


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=900)


def printed_accuracy(result: subprocess.CompletedProcess) -> float:
    return float(result.stdout.split("test accuracy: ")[1].split()[0])


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, mnist_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted two-epoch run with seed 7."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_train(
        *TINY_RUN, "trainer.max_epochs=2", "seed=7", f"data_module.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_resumed_run_ends_exactly_where_an_uninterrupted_run_ends(tmp_path, mnist_dir, two_epochs):
    uninterrupted_dir, uninterrupted = two_epochs
    run_dir = tmp_path / "run"
    # A run stopped after its first epoch, then continued from its last.ckpt alone: the run's
    # other overrides (tiny budget, seed, data_dir) are recalled from its folder.
    first = run_train(*TINY_RUN, "seed=7", f"data_module.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr
    resumed = run_train(f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=2")
    assert resumed.returncode == 0, resumed.stderr

    assert "epoch 1/2" not in resumed.stdout  # the first epoch is not trained again
    assert "epoch 2/2" in resumed.stdout
    expected = torch.load(uninterrupted_dir / "checkpoints" / "last.ckpt")
    actual = torch.load(run_dir / "checkpoints" / "last.ckpt")
    assert (actual["epoch"], actual["global_step"]) == (expected["epoch"], expected["global_step"])
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(actual["state_dict"][name], tensor), name
    assert printed_accuracy(resumed) == printed_accuracy(uninterrupted)
    assert actual["seed"] == 7
    assert actual["config"]["task"]["model"]["_target_"] == "models.SimpleModel"


def test_eval_prints_the_test_metrics_of_a_checkpoint(tmp_path, two_epochs):
    run_dir, trained = two_epochs
    best = next((run_dir / "checkpoints").glob("epoch*.ckpt"))
    result = run_script("eval.py", f"ckpt_path={best}", f"hydra.run.dir={tmp_path / 'eval'}")

    assert result.returncode == 0, result.stderr
    assert printed_accuracy(result) == printed_accuracy(trained)
    loss = float(result.stdout.split("test loss: ")[1].split()[0])
    assert loss == pytest.approx(float(trained.stdout.split("test/loss=")[1].split()[0]), abs=1e-4)


def test_predict_classifies_png_digits_either_way_round(tmp_path, mnist_dir, two_epochs):
    run_dir, _ = two_epochs
    digits = read_image_file(str(mnist_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte"))[:3].numpy()
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, digit in enumerate(digits):
        big = Image.fromarray(digit).resize((120, 120))
        big.save(folder / f"{i}-white-on-black.png")
        Image.fromarray(255 - np.asarray(big)).convert("RGB").save(folder / f"{i}-black-on-white.png")
    (folder / "notes.txt").write_text("not an image")

    result = run_script("predict.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"inputs={folder}")

    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.strip().splitlines()[1:]]
    assert sorted(Path(file).name for file, _, _ in rows) == sorted(p.name for p in folder.glob("*.png"))
    predicted = {Path(file).name: (int(digit), float(confidence)) for file, digit, confidence in rows}
    assert all(0 <= digit <= 9 and 0 < confidence <= 1 for digit, confidence in predicted.values())
    for i in range(3):  # inverting the colours does not change the answer
        assert predicted[f"{i}-white-on-black.png"] == predicted[f"{i}-black-on-white.png"]


def read_summary(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def test_sweep_summary_has_a_row_per_job_even_a_failed_one_and_a_rerun_skips_finished_jobs(tmp_path, mnist_dir):
    sweep_dir = tmp_path / "sweep"
    # The second job's learning rate fails validation: that job fails, the sweep goes on.
    args = [
        "-m",
        "task.optimizer.lr=0.001,-1",
        *TINY_RUN,
        f"data_module.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    result = run_train(*args)

    assert result.returncode != 0
    rows = read_summary(sweep_dir)
    assert [(row["job"], row["status"]) for row in rows] == [("0", "completed"), ("1", "failed")]
    assert "task.optimizer.lr=0.001" in rows[0]["overrides"]
    assert int(rows[0]["params"]) > 11_000_000
    assert 0 <= float(rows[0]["best val acc"]) <= 1
    assert 0 <= float(rows[0]["test acc"]) <= 1
    assert rows[0]["epochs"] == "1"
    assert float(rows[0]["wall time (s)"]) > 0
    assert rows[1]["error"] == "ConfigError: task.optimizer.lr=-1: a finite number > 0; fix: task.optimizer.lr=5e-05"
    summary_md = (sweep_dir / "summary.md").read_text().splitlines()
    assert summary_md[0].startswith("common: ")
    assert "`trainer=cpu`" in summary_md[0]
    table = [line for line in summary_md if line.startswith("|")]
    assert len(table) == 4  # header, rule, two jobs
    assert "task.optimizer.lr=-1" in table[3]
    assert "trainer=cpu" not in table[3]
    assert "| failed |" in table[3]
    assert (sweep_dir / "comparison.png").stat().st_size > 0
    assert "Sweep summary" in result.stdout
    assert "failed" in result.stdout
    assert (sweep_dir / "0" / "confusion_matrix.png").is_file()

    again = run_train(*args)
    assert "job 0 finished before" in again.stdout
    assert "epoch 1/1" not in again.stdout  # only the failed job ran again, and failed before training
    assert [row["status"] for row in read_summary(sweep_dir)] == ["completed", "failed"]


def test_optuna_search_reports_its_trials_and_the_same_command_continues_its_study(tmp_path, mnist_dir):
    sweep_dir = tmp_path / "optuna"
    search = [
        "-m",
        "hparams_search=mnist_optuna",
        *TINY_RUN,
        f"data_module.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    result = run_train(*search, "hydra.sweeper.n_trials=2")

    assert result.returncode == 0, result.stderr
    rows = read_summary(sweep_dir)
    assert [row["status"] for row in rows] == ["completed", "completed"]
    assert all("task.optimizer.lr=" in row["overrides"] for row in rows)
    assert "\x1b[" not in result.stderr  # Optuna's lines are plain where stderr is not a terminal
    assert "A new study created in RDB with name: mnist" in result.stderr
    first_jobs = {job: (sweep_dir / job / "run.json").stat().st_mtime for job in ("0", "1")}

    # Again with a larger budget: the stored trials count, so one trial runs, in the next folder.
    again = run_train(*search, "hydra.sweeper.n_trials=3")

    assert again.returncode == 0, again.stderr
    assert "has 2 completed trials of n_trials=3: running 1 more" in again.stdout
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1", "2"]
    assert {job: (sweep_dir / job / "run.json").stat().st_mtime for job in ("0", "1")} == first_jobs
    study = load_study(sweep_dir)
    assert [trial.state.name for trial in study.trials] == ["COMPLETE"] * 3
    assert study.trials[2].params != study.trials[0].params  # the seeded sampler does not start over
    rows = read_summary(sweep_dir)
    assert [row["status"] for row in rows] == ["completed"] * 3
    assert len([line for line in (sweep_dir / "summary.md").read_text().splitlines() if line.startswith("| ")]) == 4
    best = (sweep_dir / "optimization_results.yaml").read_text()
    assert float(best.split("best_value: ")[1]) == pytest.approx(study.best_value)
    assert max(float(row["best val acc"]) for row in rows) == pytest.approx(study.best_value, abs=1e-4)
    assert (sweep_dir / "optimization_history.png").stat().st_size > 0
    assert (sweep_dir / "param_slices.png").stat().st_size > 0

    # Another search space in the same study is refused before any trial.
    other = run_train(*search, "hydra.sweeper.n_trials=4", "data_module.batch_size=choice(32,64)")

    assert other.returncode == 2
    errors = [line for line in other.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, other.stderr
    assert "data_module.batch_size in CategoricalDistribution(choices=(32, 64))" in errors[0]
    assert "; fix: " in errors[0]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1", "2"]
    assert len(load_study(sweep_dir).trials) == 3


def load_study(sweep_dir: Path):
    import optuna

    return optuna.load_study(study_name="mnist", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
