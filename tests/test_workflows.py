"""End to end with `callbacks=default`: resume, the best checkpoint, interrupts, a nan stop, moving
averages, continued loggers, evaluate, predict, sweep report and Optuna search, each on a tiny budget.

Runs are `train(cfg)` in this process (`train_here`) unless the behaviour is the command line:
signals, sweeps, eval.py and predict.py.
"""

import contextlib
import csv
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import PROJECT_DIR, TINY_RUN, run_train
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from PIL import Image
from torchvision.datasets.mnist import read_image_file

from train import CONFIG_DIR, as_group_choice, train

# A run that continues in its own folder finds its checkpoints there: Lightning says so, rightly.
pytestmark = pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
TESTS_ON_PATH = {"PYTHONPATH": str(Path(__file__).parent)}  # for diverging_loss
DEFAULTS = ["callbacks=default", "logger=default"]


def train_here(run_dir: Path, *overrides: str, base: tuple[str, ...] = (*TINY_RUN, *DEFAULTS)) -> dict[str, float]:
    """`train(cfg)` in this process, as `python train.py TINY_RUN... callbacks=default logger=default
    <overrides> hydra.run.dir=<run_dir>` would run it (without the Hydra callbacks: no run.json).
    Every step is logged: with Lightning's 10, 3-batch epochs would log none."""
    args = [*base, "trainer.log_every_n_steps=1", *overrides, f"hydra.run.dir={run_dir}"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="config", overrides=[as_group_choice(arg) for arg in args], return_hydra_config=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.name = "train"
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return train(cfg)


@contextlib.contextmanager
def lightning_lines() -> Iterator[list[str]]:
    """The lines Lightning's rank_zero_info logs (train.py's `test accuracy: ...` among them)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("pytorch_lightning")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def checkpoint_tested(lines: list[str]) -> str:
    [line] = [line for line in lines if line.startswith("test accuracy: ")]
    return line.split("(", 1)[1].rstrip(")")


def csv_rows(run_dir: Path, name: str) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [row for row in csv.DictReader(f) if row.get(name)]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, mnist_dir) -> tuple[Path, dict[str, float], list[str]]:
    """An uninterrupted two-epoch run with seed 7: its folder, metrics and Lightning's lines."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    with lightning_lines() as lines:
        metrics = train_here(run_dir, "trainer.max_epochs=2", "+seed=7", f"data_module.data_dir={mnist_dir}")
    return run_dir, metrics, lines


def test_resumed_run_ends_exactly_where_an_uninterrupted_run_ends(tmp_path, mnist_dir, two_epochs):
    uninterrupted_dir, uninterrupted, _ = two_epochs
    run_dir = tmp_path / "run"
    common = ["+seed=7", f"data_module.data_dir={mnist_dir}"]
    train_here(run_dir, *common)  # stopped after its first epoch
    last = run_dir / "checkpoints" / "last.ckpt"
    resumed = train_here(run_dir, *common, "trainer.max_epochs=2", f"+ckpt_path={last}")

    expected = torch.load(uninterrupted_dir / "checkpoints" / "last.ckpt")
    actual = torch.load(last)
    assert (actual["epoch"], actual["global_step"]) == (expected["epoch"], expected["global_step"]) == (1, 6)
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(actual["state_dict"][name], tensor), name
    assert resumed["test/acc"] == uninterrupted["test/acc"]
    assert resumed["test/loss"] == uninterrupted["test/loss"]
    # The continued loggers hold each epoch once: the first part's rows kept, none repeated.
    assert [int(row["epoch"]) for row in csv_rows(run_dir, "train/loss_epoch")] == [0, 1]
    assert [row["train/loss_epoch"] for row in csv_rows(run_dir, "train/loss_epoch")] == [
        row["train/loss_epoch"] for row in csv_rows(uninterrupted_dir, "train/loss_epoch")
    ]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert [event.step for event in events.Scalars("train/loss_epoch")] == [2, 5]


def test_a_fresh_run_in_a_used_folder_starts_a_fresh_metrics_file(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    train_here(run_dir, f"data_module.data_dir={mnist_dir}")
    train_here(run_dir, f"data_module.data_dir={mnist_dir}")
    assert [int(row["epoch"]) for row in csv_rows(run_dir, "train/loss_epoch")] == [0]


def test_the_test_uses_the_best_checkpoint_which_keeps_weights_only(two_epochs):
    """Lightning's `trainer.checkpoint_callback` is the first ModelCheckpoint: callbacks/default.yaml
    lists the best one (val/acc) first, so the test, run.json and TrackedFiles read the best."""
    run_dir, _, lines = two_epochs
    checkpoints = {path.name for path in (run_dir / "checkpoints").iterdir()}
    [best] = checkpoints - {"last.ckpt"}
    assert best.startswith("epoch")
    assert Path(checkpoint_tested(lines)) == run_dir / "checkpoints" / best
    assert "optimizer_states" not in torch.load(run_dir / "checkpoints" / best)  # the test needs weights only
    assert "optimizer_states" in torch.load(run_dir / "checkpoints" / "last.ckpt")  # a resume needs Adam's state
    cfg = OmegaConf.load(CONFIG_DIR / "callbacks" / "default.yaml")
    first = next(node for node in cfg.values() if node._target_.endswith("ModelCheckpoint"))
    assert (first.monitor, first.mode, first.save_weights_only) == ("val/acc", "max", True)


def test_a_nan_loss_stops_the_run_with_diverged(tmp_path, mnist_dir):
    from mnist_extras.divergence import Diverged

    sys.path.insert(0, str(Path(__file__).parent))
    try:
        with pytest.raises(Diverged, match="the training loss became nan or inf by step 0"):
            train_here(
                tmp_path / "run",
                "task.loss_function._target_=tests.diverging_loss.NaNFromStep",
                "trainer.log_every_n_steps=1",
                f"data_module.data_dir={mnist_dir}",
            )
    finally:
        sys.path.remove(str(Path(__file__).parent))


def test_a_moving_average_continues_on_resume_and_is_what_the_checkpoints_hold(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    common = ["callbacks=ema", "callbacks.moving_average.decay=0.5", f"data_module.data_dir={mnist_dir}"]
    train_here(run_dir, *common)
    last = run_dir / "checkpoints" / "last.ckpt"
    train_here(run_dir, *common, "trainer.max_epochs=2", f"+ckpt_path={last}")

    checkpoint = torch.load(last)
    assert checkpoint["averaging_state"]["n_averaged"] == 6  # 3 steps an epoch: the first epoch's average went on
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert any(not torch.equal(averaged[name], raw[name]) for name in averaged)


def test_the_moving_average_step_is_timms_warm_up_then_the_decay():
    from mnist_extras.averaging import moving_average_step

    averaged, current = [torch.zeros(3), torch.tensor([1])], [torch.ones(3), torch.tensor([5])]
    moving_average_step(averaged, current, torch.tensor(0), decay=0.99)
    assert torch.allclose(averaged[0], torch.full((3,), 0.9))  # decay (1 + 0) / (10 + 0) = 0.1 at first
    assert averaged[1].item() == 5  # counters are copied
    moving_average_step(averaged, current, torch.tensor(10**6), decay=0.99)
    assert torch.allclose(averaged[0], torch.full((3,), 0.9 + 0.1 * 0.01))


# A run folder a user might have: spaces and a non-ASCII letter.
AWKWARD = "my runs/é 1"


def test_the_continue_line_quotes_what_was_recorded_for_the_shell_and_hydra(tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mnist_extras.checkpoints import continue_command

    run_dir = tmp_path / AWKWARD
    (run_dir / ".hydra").mkdir(parents=True)
    recorded = ["trainer=cpu", "data_module.data_dir='/data/ünï code'", f"hydra.run.dir='{run_dir}'", "+ckpt_path=x"]
    (run_dir / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(recorded))
    checkpoint = run_dir / "checkpoints" / "last.ckpt"

    words = shlex.split(continue_command(run_dir, checkpoint))

    assert words[:4] == ["python", "train.py", "trainer=cpu", "data_module.data_dir='/data/ünï code'"]
    parsed = {o.get_key_element(): o.value() for o in OverridesParser.create().parse_overrides(words[2:])}
    assert parsed["+ckpt_path"] == str(checkpoint)
    assert parsed["hydra.run.dir"] == str(run_dir)
    assert len(words) == 6  # the recorded ckpt_path and hydra.run.dir are replaced, not repeated


def test_an_interrupt_while_testing_says_training_had_finished_and_how_to_continue(tmp_path, capsys):
    from pytorch_lightning.trainer.states import TrainerFn
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from mnist_extras.checkpoints import SaveOnInterrupt

    callback = SaveOnInterrupt(tmp_path)
    callback.path.parent.mkdir()
    callback.path.write_bytes(b"the last epoch")
    trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.TESTING), is_global_zero=True)
    with lightning_lines() as lines:
        callback.on_exception(trainer, None, SIGTERMException())
    [line] = lines
    assert "the run had finished training" in line
    assert "continue with: python train.py '+ckpt_path=" in line
    assert callback.path.read_bytes() == b"the last epoch"  # the test's (best) weights are not saved over it


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=900)


def printed_accuracy(result: subprocess.CompletedProcess) -> float:
    return float(result.stdout.split("test accuracy: ")[1].split()[0])


@pytest.mark.slow
def test_eval_agrees_with_the_run_on_the_batches_it_tested(tmp_path, mnist_dir, two_epochs):
    """The whole test set, whatever limit the run had: tests/test_ddp.py (summed over two processes)."""
    run_dir, trained, lines = two_epochs
    # The same two batches the run tested on (its limit is not inherited; this command sets it).
    limited = run_script(
        "eval.py",
        f"ckpt_path={checkpoint_tested(lines)}",
        "trainer=cpu",
        f"data_module.data_dir={mnist_dir}",
        "+trainer.limit_test_batches=2",
        f"hydra.run.dir={tmp_path}",
    )
    assert limited.returncode == 0, limited.stderr
    assert printed_accuracy(limited) == pytest.approx(trained["test/acc"], abs=1e-4)  # printed to 4 places
    assert "on 128 test images" in limited.stdout


@pytest.mark.slow
def test_predict_gives_what_the_model_says_of_the_original_digit_either_way_round(tmp_path, mnist_dir, learned):
    from data_modules import normalize
    from mnist_extras.loading import load_task

    digits = read_image_file(str(mnist_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte"))[:8]
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, digit in enumerate(digits.numpy()):
        big = Image.fromarray(digit).resize((120, 120))
        big.save(folder / f"{i}-white-on-black.png")
        Image.fromarray(255 - np.asarray(big)).convert("RGB").save(folder / f"{i}-black-on-white.png")
    (folder / "notes.txt").write_text("not an image")
    checkpoint = next((learned[0] / "checkpoints").glob("*.ckpt"))

    result = run_script("predict.py", f"ckpt_path={checkpoint}", f"inputs={folder}")

    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.strip().splitlines()[1:]]
    assert sorted(Path(file).name for file, _, _ in rows) == sorted(p.name for p in folder.glob("*.png"))
    predicted = {Path(file).name: (int(digit), float(confidence)) for file, digit, confidence in rows}
    task = load_task(checkpoint)
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


@pytest.mark.slow
def test_optuna_search_reports_its_trials_and_the_same_command_continues_its_study(tmp_path, mnist_dir):
    sweep_dir = tmp_path / "optuna"
    search = [
        "-m",
        "hparams_search=mnist_optuna_resumable",  # the study in optuna.db: the same command continues it
        "++trainer.fast_dev_run=true",  # a smoke test of the search: no checkpoint, one validation
        *TINY_RUN,
        f"data_module.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    result = run_train(*search, "hydra.sweeper.n_trials=1")

    assert result.returncode == 0, result.stderr
    assert [row["status"] for row in read_summary(sweep_dir)] == ["completed"]
    assert not list(sweep_dir.glob("*/checkpoints/epoch*.ckpt"))  # fast_dev_run saves no best checkpoint

    # Again with a larger budget: the stored trials count, so one trial runs, in the next folder.
    again = run_train(*search, "hydra.sweeper.n_trials=2")

    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]
    import optuna

    study = optuna.load_study(study_name="mnist", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert [trial.state.name for trial in study.trials] == ["COMPLETE"] * 2
    rows = read_summary(sweep_dir)
    assert [row["status"] for row in rows] == ["completed"] * 2
    assert all("task.optimizer.lr=" in row["overrides"] for row in rows)  # what the trials differ in


@pytest.mark.slow
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
    assert json.loads((run_dir / "run.json").read_text())["epochs"] == 2
    assert "Monitored metric val/acc did not improve in the last 1 records" in (run_dir / "train.log").read_text()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()  # the default callbacks still run


@pytest.mark.slow
def test_a_sweep_stopped_by_sigterm_continues_when_run_again_and_sums_up_every_job_a_failed_one_too(
    tmp_path, mnist_dir
):
    """A scheduler's SIGTERM reaches the sweep and its running job (one process group). The second job's
    loss turns nan: that job fails, and the sweep goes on."""
    sweep_dir = tmp_path / "sweep"
    args = [
        "-m",
        "hydra/launcher=subprocess",  # the launcher that resumes a sweep run again
        "task.loss_function._target_=loss_functions.CrossEntropyLoss,tests.diverging_loss.NaNFromStep",
        *TINY_RUN,
        *DEFAULTS,
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=20",
        "data_module.batch_size=16",
        f"data_module.data_dir={mnist_dir}",
        "+job_tag='num=${hydra:job.num} id=${hydra:job.id}'",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    process = subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=PROJECT_DIR,
        env={**os.environ, **TESTS_ON_PATH},
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

    again = run_train(*args, env=TESTS_ON_PATH)
    assert again.returncode == 1
    assert "job 0 continues from" in again.stdout
    assert "Traceback" not in again.stderr  # the failed job's line, not a traceback of the sweep
    rows = read_summary(sweep_dir)
    assert [(row["job"], row["status"]) for row in rows] == [("0", "completed"), ("1", "failed")]
    assert "loss_functions.CrossEntropyLoss" in rows[0]["overrides"]
    assert 0 <= float(rows[0]["best val acc"]) <= 1
    assert 0 <= float(rows[0]["test acc"]) <= 1
    assert "the training loss became nan or inf" in rows[1]["error"]
    assert (sweep_dir / "comparison.png").stat().st_size > 0
    assert (sweep_dir / "0" / "confusion_matrix.png").is_file()
    assert [int(row["epoch"]) for row in csv_rows(sweep_dir / "0", "train/loss_epoch")] == [0, 1]
    for job in (0, 1):  # Hydra's job number and id in each job, as Hydra's own launcher gives them
        assert f"num={job} id={job}" in (sweep_dir / str(job) / "config_tree.txt").read_text()
        hydra_cfg = yaml.safe_load((sweep_dir / str(job) / ".hydra" / "hydra.yaml").read_text())["hydra"]
        assert (hydra_cfg["job"]["num"], str(hydra_cfg["job"]["id"])) == (job, str(job))


def test_the_atomic_checkpoint_writer_plugs_into_the_trainer_from_a_callback(tmp_path):
    import pytorch_lightning as pl

    from mnist_extras.checkpoints import AtomicCheckpointIO, AtomicCheckpoints

    callback = AtomicCheckpoints()
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[callback], default_root_dir=tmp_path)
    callback.setup(trainer, None, "fit")
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
