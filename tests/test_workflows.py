"""End to end: resume, evaluate, predict, sweep report and Optuna search, each on a tiny budget."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN, run_train
from PIL import Image
from torchvision.datasets.mnist import read_image_file

from mnist_extras.errors import PROJECT_DIR

pytestmark = pytest.mark.slow
TESTS_ON_PATH = {"PYTHONPATH": str(Path(__file__).parent)}  # for diverging_loss


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


def test_eval_tests_the_whole_set_unless_told_and_agrees_with_the_run(tmp_path, two_epochs):
    run_dir, trained = two_epochs
    best = next((run_dir / "checkpoints").glob("epoch*.ckpt"))

    # The same two batches the run tested on (its limit is not inherited; this command sets it).
    limited = run_script(
        "eval.py", f"ckpt_path={best}", "+trainer.limit_test_batches=2", f"hydra.run.dir={tmp_path / 'a'}"
    )
    assert limited.returncode == 0, limited.stderr
    assert printed_accuracy(limited) == printed_accuracy(trained)
    loss = float(limited.stdout.split("test loss: ")[1].split()[0])
    assert loss == pytest.approx(float(trained.stdout.split("test/loss=")[1].split()[0]), abs=1e-4)
    assert "on 128 test images" in limited.stdout

    whole = run_script("eval.py", f"ckpt_path={best}", f"hydra.run.dir={tmp_path / 'b'}")
    assert whole.returncode == 0, whole.stderr
    assert "on 10000 test images" in whole.stdout
    assert "on 10000 test images" in (tmp_path / "b" / "eval.log").read_text()


def test_predict_gives_what_the_model_says_of_the_original_digit_either_way_round(tmp_path, mnist_dir, learned):
    from mnist_extras.checkpoints import load_task
    from data_modules import normalize

    digits = read_image_file(str(mnist_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte"))[:8]
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, digit in enumerate(digits.numpy()):
        big = Image.fromarray(digit).resize((120, 120))
        big.save(folder / f"{i}-white-on-black.png")
        Image.fromarray(255 - np.asarray(big)).convert("RGB").save(folder / f"{i}-black-on-white.png")
    (folder / "notes.txt").write_text("not an image")
    checkpoint = learned / "checkpoints" / "last.ckpt"

    result = run_script("predict.py", f"ckpt_path={checkpoint}", f"inputs={folder}")

    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.strip().splitlines()[1:]]
    assert sorted(Path(file).name for file, _, _ in rows) == sorted(p.name for p in folder.glob("*.png"))
    predicted = {Path(file).name: (int(digit), float(confidence)) for file, digit, confidence in rows}
    task, _ = load_task(checkpoint)
    with torch.inference_mode():
        expected = task(normalize(digits.unsqueeze(1))).softmax(dim=1).max(dim=1)
    agree = 0
    for i in range(len(digits)):
        for way in ("white-on-black", "black-on-white"):
            digit, confidence = predicted[f"{i}-{way}.png"]
            agree += digit == int(expected.indices[i])
        assert predicted[f"{i}-white-on-black.png"] == predicted[f"{i}-black-on-white.png"]
    assert agree >= 14  # of 16: resizing to 120x120 and back may tip a digit the model is unsure of


def read_summary(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def test_sweep_summary_has_a_row_per_job_even_a_failed_one_and_a_rerun_skips_finished_jobs(tmp_path, mnist_dir):
    sweep_dir = tmp_path / "sweep"
    # The second job's loss turns nan: that job fails, the sweep goes on.
    args = [
        "-m",
        "task.loss_function._target_=loss_functions.CrossEntropyLoss,diverging_loss.NaNFromStep",
        *TINY_RUN,
        f"data_module.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    result = run_train(*args, env=TESTS_ON_PATH)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr  # the failed job's line, not a traceback of the sweep
    rows = read_summary(sweep_dir)
    assert [(row["job"], row["status"]) for row in rows] == [("0", "completed"), ("1", "failed")]
    assert "loss_functions.CrossEntropyLoss" in rows[0]["overrides"]
    assert int(rows[0]["params"]) > 11_000_000
    assert 0 <= float(rows[0]["best val acc"]) <= 1
    assert 0 <= float(rows[0]["test acc"]) <= 1
    assert rows[0]["epochs"] == "1"
    assert float(rows[0]["wall time (s)"]) > 0
    assert "the training loss became nan or inf" in rows[1]["error"]
    summary_md = (sweep_dir / "summary.md").read_text().splitlines()
    assert summary_md[0].startswith("common: ")
    assert "`trainer=cpu`" in summary_md[0]
    table = [line for line in summary_md if line.startswith("|")]
    assert len(table) == 4  # header, rule, two jobs
    assert "diverging_loss.NaNFromStep" in table[3]
    assert "trainer=cpu" not in table[3]
    assert "| failed |" in table[3]
    assert (sweep_dir / "comparison.png").stat().st_size > 0
    assert "Sweep summary" in result.stdout
    assert (sweep_dir / "0" / "confusion_matrix.png").is_file()

    again = run_train(*args, env=TESTS_ON_PATH)
    assert "job 0 finished before" in again.stdout
    assert "#1 : " in again.stdout  # the failed job ran again, and failed before its first epoch ended
    assert "epoch 1/1" not in again.stdout
    assert [row["status"] for row in read_summary(sweep_dir)] == ["completed", "failed"]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["trainer=cpu", "task.optimizer.lr=0.1,-1"], "error: task.optimizer.lr=-1: a finite number > 0;"),
        (["task.model.backbone=resnet18,resnet34"], "error: trainer.accelerator=gpu: PyTorch sees no CUDA GPU here;"),
    ],
)
def test_every_point_of_a_sweep_is_checked_before_the_first_job(tmp_path, args, line):
    if "gpu" in line and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    sweep_dir = tmp_path / "sweep"
    result = run_train("-m", *args, "task.model.backbone.pretrained=false", f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(line)
    assert not sweep_dir.exists()


def test_optuna_search_reports_its_trials_and_the_same_command_continues_its_study(tmp_path, mnist_dir):
    sweep_dir = tmp_path / "optuna"
    search = [
        "-m",
        "hparams_search=mnist_optuna",
        "++trainer.fast_dev_run=true",  # a smoke test of the search: no checkpoint, one validation
        *TINY_RUN,
        f"data_module.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    result = run_train(*search, "hydra.sweeper.n_trials=2")

    assert result.returncode == 0, result.stderr
    rows = read_summary(sweep_dir)
    assert [row["status"] for row in rows] == ["completed", "completed"]
    assert all("task.optimizer.lr=" in row["overrides"] for row in rows)
    assert all(0 <= float(row["best val acc"]) <= 1 for row in rows)  # the objective: the one validation
    assert not list(sweep_dir.glob("*/checkpoints/*.ckpt"))  # fast_dev_run saves none
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


def test_early_stopping_from_the_callbacks_group_stops_and_says_why(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    result = run_train(
        *TINY_RUN,
        "callbacks=early_stopping",
        "callbacks.early_stopping.patience=1",
        "callbacks.early_stopping.min_delta=0.5",  # no epoch can beat the first by that much
        "trainer.max_epochs=20",
        f"data_module.data_dir={mnist_dir}",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((run_dir / "run.json").read_text())
    assert record["epochs"] == 2
    assert "did not improve" in record["stopped"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()  # the default callbacks still run


def test_a_moving_average_continues_on_resume_and_is_what_the_run_tests_and_eval_scores(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    first = run_train(
        *TINY_RUN,
        "callbacks=ema",
        "callbacks.moving_average.decay=0.5",
        f"data_module.data_dir={mnist_dir}",
        f"hydra.run.dir={run_dir}",
    )
    assert first.returncode == 0, first.stderr
    resumed = run_train(f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=2")
    assert resumed.returncode == 0, resumed.stderr

    last = torch.load(run_dir / "checkpoints" / "last.ckpt")
    assert last["averaging_state"]["n_averaged"] == 6  # 3 steps an epoch: the first epoch's average went on
    averaged, raw = last["state_dict"], last["current_model_state"]
    assert any(not torch.equal(averaged[name], raw[name]) for name in averaged)
    best = resumed.stdout.split("test accuracy: ")[1].split("(")[1].split(";")[0]
    evaluated = run_script(
        "eval.py", f"ckpt_path={best}", "+trainer.limit_test_batches=2", f"hydra.run.dir={tmp_path}/e"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    # eval.py scores the checkpoint's averaged weights: the run's own test must have scored the same.
    loss = float(evaluated.stdout.split("test loss: ")[1].split()[0])
    assert loss == pytest.approx(float(resumed.stdout.split("test/loss=")[1].split()[0]), abs=1e-4)
    assert printed_accuracy(evaluated) == printed_accuracy(resumed)


def test_a_tensorboard_only_run_continues_with_every_epoch_once_in_its_events(tmp_path, mnist_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    common = [*TINY_RUN, "logger=tensorboard", f"data_module.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}"]
    assert run_train(*common).returncode == 0
    result = run_train(f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=2")
    assert result.returncode == 0, result.stderr

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    epochs = [event.step for event in events.Scalars("train/loss_epoch")]
    assert len(epochs) == 2
    assert epochs == sorted(set(epochs))
    assert not (run_dir / "metrics.csv").exists()  # logger=tensorboard alone
    assert json.loads((run_dir / "run.json").read_text())["epochs"] == 2


def test_a_run_without_loggers_still_leaves_its_record(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    result = run_train(*TINY_RUN, "logger=none", f"data_module.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert not (run_dir / "metrics.csv").exists()
    assert not (run_dir / "tensorboard").exists()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed"
    assert 0 <= record["metrics"]["test/acc"] <= 1


def test_a_sweep_stopped_by_sigterm_continues_when_run_again(tmp_path, mnist_dir):
    """A scheduler's SIGTERM reaches the sweep and its running job (one process group)."""
    sweep_dir = tmp_path / "sweep"
    args = [
        "-m",
        "task.optimizer.lr=0.001,0.002",
        *TINY_RUN,
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=20",
        "data_module.batch_size=16",
        f"data_module.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    process = subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=PROJECT_DIR,
        text=True,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    last = sweep_dir / "0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 600
    while not last.is_file():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)
    process.communicate(timeout=300)
    assert json.loads((sweep_dir / "0" / "run.json").read_text())["status"] == "interrupted"
    assert not (sweep_dir / "1").exists()

    again = run_train(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "job 0 continues from" in again.stdout
    assert [row["status"] for row in read_summary(sweep_dir)] == ["completed", "completed"]
    with (sweep_dir / "0" / "metrics.csv").open() as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f) if row["train/loss_epoch"]]
    assert epochs == [0, 1]
