"""Run records (run.json), the folder lock, and the sweeps' launchers: which jobs run, as what, and
what each leaves. Hooks are called in the process where that shows the rule; subprocesses only
where the behaviour is the command line."""

import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_RUN, run_here, run_train
from filelock import FileLock
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from PIL import Image

from hydra_plugins import subprocess_launcher
from hydra_plugins.subprocess_launcher import JobFailed, SubprocessLauncher
from mnist_extras import checkpoints
from mnist_extras.checkpoints import AtomicCheckpointIO
from mnist_extras.errors import quoted
from mnist_extras.records import RunRecord, mark_interrupted, read_record, write_record
from mnist_extras.sweeps import summary_rows, write_summary
from predict import to_mnist

TESTS_DIR = Path(__file__).parent
FAST_RUN = ["debug=fdr", "trainer=cpu", "task.model.backbone.pretrained=false"]


def job_config(run_dir: Path, *overrides: str, **values) -> OmegaConf:
    return OmegaConf.create(
        {**values, "hydra": {"runtime": {"output_dir": str(run_dir)}, "overrides": {"task": list(overrides)}}}
    )


def completed(value=None) -> JobReturn:
    ret = JobReturn()
    ret.status, ret.return_value = JobStatus.COMPLETED, value
    return ret


def failed(err: BaseException) -> JobReturn:
    ret = JobReturn()
    ret.status, ret.return_value = JobStatus.FAILED, err
    return ret


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    names = sorted({name for row in rows for name in row})
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def rank_zero(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(key, raising=False)


def run_job(run_dir: Path, config, end: JobReturn, metrics: list[dict] | None = None) -> dict:
    record = RunRecord()
    record.on_job_start(config)
    if metrics is not None:
        write_metrics(run_dir, metrics)
    record.on_job_end(config, end)
    return read_record(run_dir)


def test_a_record_holds_the_runs_metrics_epochs_objective_and_seed(tmp_path, rank_zero, capsys):
    rows = [
        {"epoch": 0, "step": 9, "train/loss_epoch": 2.0, "val/acc": 0.5, "val/acc_best": 0.5, "val/loss": 1.0},
        {"epoch": 1, "step": 19, "train/loss_epoch": 1.0, "val/acc": 0.4, "val/acc_best": 0.5, "val/loss": 1.2},
        {"epoch": 2, "step": 20, "test/acc": 0.45},  # the test's row: the epoch count after fit, no epoch
    ]
    config = job_config(tmp_path, "+seed=3", "trainer=cpu", seed=3)

    record = run_job(tmp_path, config, completed(0.5), rows)

    assert record["status"] == "completed"
    assert (record["seed"], record["overrides"], record["epochs"]) == (3, ["+seed=3", "trainer=cpu"], 2)
    assert record["metrics"] == {
        "train/loss_epoch": 1.0,
        "val/acc": 0.4,
        "val/acc_best": 0.5,
        "val/loss": 1.2,
        "test/acc": 0.45,
        "objective": 0.5,
    }
    assert "seed" in (tmp_path / "config_tree.txt").read_text()
    assert "hydra" not in (tmp_path / "config_tree.txt").read_text()


def test_a_fresh_run_in_a_used_folder_keeps_nothing_of_the_earlier_run(tmp_path, rank_zero, capsys):
    earlier = {"status": "completed", "metrics": {"val/acc_best": 0.9}, "epochs": 5, "wall_time_s": 500.0}
    write_record(tmp_path, earlier)
    write_metrics(tmp_path, [{"epoch": 4, "step": 1, "val/acc_best": 0.9}])
    old = time.time() - 60
    os.utime(tmp_path / "metrics.csv", (old, old))  # fast_dev_run writes none: this one is the earlier run's

    record = run_job(tmp_path, job_config(tmp_path, "debug=fdr"), failed(RuntimeError("boom\nmore")))

    assert record["status"] == "failed"
    assert record["error"] == "RuntimeError: boom"
    assert "metrics" not in record
    assert "epochs" not in record
    assert record["wall_time_s"] < 60
    assert record["seed"] == 0  # train.py's default


def test_only_a_run_that_continues_its_own_folders_checkpoint_extends_the_record(tmp_path, rank_zero, capsys):
    run_dir, other = tmp_path / "run", tmp_path / "other"
    earlier = {"status": "interrupted", "metrics": {"val/acc_best": 0.9, "val/acc": 0.9}, "epochs": 1}
    write_record(run_dir, {**earlier, "wall_time_s": 100.0, "overrides": ["trainer=cpu"], "error": "SIGTERM"})
    own = run_dir / "checkpoints" / "last.ckpt"

    config = job_config(run_dir, "trainer=cpu", f"+ckpt_path={quoted(own)}", ckpt_path=str(own))
    record = run_job(run_dir, config, completed(), [{"epoch": 1, "step": 5, "val/acc": 0.8, "val/acc_best": 0.9}])

    assert (record["status"], record["epochs"], record["resumed_from"]) == ("completed", 2, [str(own)])
    assert record["wall_time_s"] >= 100.0
    assert record["metrics"] == {"val/acc_best": 0.9, "val/acc": 0.8}
    assert record["overrides"] == ["trainer=cpu"]  # the checkpoint is not a setting of the run
    assert "error" not in record

    # Fine-tuning from another run's checkpoint is a new run with its own record.
    write_record(other, {"status": "completed", "wall_time_s": 100.0, "metrics": {"val/acc": 0.1}})
    record = run_job(other, job_config(other, ckpt_path=str(own)), completed())
    assert record["wall_time_s"] < 100.0
    assert (record["resumed_from"], "metrics" in record) == ([str(own)], False)


def test_other_ranks_write_nothing_and_an_interrupt_is_marked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "1")
    record = RunRecord()
    record.on_job_start(job_config(tmp_path))
    record.on_job_end(job_config(tmp_path), completed())
    assert not (tmp_path / "run.json").exists()
    assert not (tmp_path / ".run.lock").exists()

    write_record(tmp_path, {"status": "running"})
    mark_interrupted(tmp_path, "SIGTERM at epoch 1; continue with: python train.py ...")
    assert read_record(tmp_path) == {
        "status": "interrupted",
        "error": "SIGTERM at epoch 1; continue with: python train.py ...",
    }


def test_a_command_into_a_folder_in_use_is_refused_in_one_line_and_changes_no_record(
    tmp_path, mnist_dir, capsys, monkeypatch
):
    run_dir = tmp_path / "run"
    write_record(run_dir, {"status": "running", "overrides": ["trainer=cpu"], "wall_time_s": 1.0})
    before = (run_dir / "run.json").read_bytes()

    with FileLock(run_dir / ".run.lock"):  # as a run training in that folder holds it
        args = [*FAST_RUN, f"data_module.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}"]
        assert run_here("train.py", *args, monkeypatch=monkeypatch) == 2

    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: hydra.run.dir={run_dir}: a run is using this folder now; "
        "fix: wait for it, or pick another hydra.run.dir"
    )
    assert (run_dir / "run.json").read_bytes() == before
    assert sorted(p.name for p in run_dir.iterdir()) == [".run.lock", "run.json"]  # nor .hydra/ or a log


def test_two_fresh_runs_into_one_folder_leave_the_record_of_the_second_alone(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    data = f"data_module.data_dir={mnist_dir}"
    first = run_train(*TINY_RUN, data, "+seed=1", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr
    assert read_record(run_dir)["metrics"]["val/acc_best"] >= 0

    # The second fails in its one step: nan loss, which fast_dev_run's anomaly detection stops.
    started = time.monotonic()
    second = run_train(
        *FAST_RUN,
        data,
        "task.loss_function._target_=tests.diverging_loss.NaNFromStep",
        f"hydra.run.dir={run_dir}",
        env={"PYTHONPATH": str(TESTS_DIR)},
    )
    elapsed = time.monotonic() - started

    assert second.returncode != 0
    record = read_record(run_dir)
    assert record["status"] == "failed"
    assert record["seed"] == 0
    assert "+seed=1" not in record["overrides"]
    assert "metrics" not in record
    assert "epochs" not in record
    assert record["wall_time_s"] < elapsed  # not the sum of both runs


def test_a_search_on_hydras_launcher_numbers_its_jobs_and_optimises_the_tasks_best_accuracy(tmp_path, mnist_dir):
    """Whatever the checkpoint monitors; the subprocess launcher's job numbers: tests/test_workflows.py."""
    sweep_dir = tmp_path / "search"
    # As +experiment=mnist_997 does: the checkpoint callback keeps the lowest val/loss.
    monitor_loss = (
        "+callbacks={best: {_target_: pytorch_lightning.callbacks.ModelCheckpoint, "
        "dirpath: '${hydra:runtime.output_dir}/checkpoints', monitor: val/loss, mode: min}}"
    )
    result = run_train(
        "-m",
        "hparams_search=mnist_optuna",
        "hydra.sweeper.n_trials=2",
        monitor_loss,
        *TINY_RUN,
        f"data_module.data_dir={mnist_dir}",
        "+job_tag='num=${hydra:job.num} id=${hydra:job.id}'",
        f"hydra.sweep.dir={sweep_dir}",
    )

    assert result.returncode == 0, result.stderr
    for job in (0, 1):
        assert f"num={job} id={job}" in (sweep_dir / str(job) / "config_tree.txt").read_text()  # resolved in the job
        hydra_cfg = yaml.safe_load((sweep_dir / str(job) / ".hydra" / "hydra.yaml").read_text())["hydra"]
        assert (hydra_cfg["job"]["num"], str(hydra_cfg["job"]["id"])) == (job, str(job))
        metrics = read_record(sweep_dir / str(job))["metrics"]
        assert metrics["objective"] == pytest.approx(metrics["val/acc_best"])
        assert metrics["objective"] != pytest.approx(metrics["val/loss"])
    assert [row["status"] for row in summary_rows(sweep_dir)] == ["completed", "completed"]
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())["best_value"]
    best_val_acc = max(read_record(sweep_dir / str(job))["metrics"]["val/acc_best"] for job in (0, 1))
    assert best == pytest.approx(best_val_acc)


# The subprocess launcher's decisions, with the job's process replaced by what it would leave.


@pytest.fixture
def launcher(tmp_path, monkeypatch):
    commands = []

    def fake_job(command, keep=20):
        commands.append(command)
        job_dir = Path(OverridesParser.create().parse_override(command[-5]).value())
        metrics = {"objective": 0.5, "val/acc_best": 0.5}
        write_record(job_dir, {"status": "completed", "overrides": ["lr=1"], "metrics": metrics})
        return 0, []

    monkeypatch.setattr(subprocess_launcher, "run_teeing_stderr", fake_job)
    launcher = SubprocessLauncher()
    launcher.config = OmegaConf.create(
        {
            "optimized_metric": "val/acc_best",
            "hydra": {"sweeper": {"_target_": "OptunaSweeper"}, "overrides": {"hydra": []}},
        }
    )
    launcher.commands = commands
    return launcher


def test_the_launcher_skips_a_completed_job_and_continues_an_interrupted_one(launcher, tmp_path):
    done, stopped = tmp_path / "0", tmp_path / "1 it's"
    write_record(done, {"status": "completed", "overrides": ["lr=1"], "metrics": {"objective": 0.7}})
    write_record(stopped, {"status": "interrupted", "overrides": ["lr=1"]})
    (stopped / "checkpoints").mkdir()
    (stopped / "checkpoints" / "last.ckpt").write_bytes(b"x")

    assert launcher.run_job(["lr=1"], done, 0, tmp_path).return_value == 0.7
    assert launcher.commands == []
    assert launcher.run_job(["lr=1"], stopped, 1, tmp_path).return_value == 0.5

    (command,) = launcher.commands
    resume = next(arg for arg in command if "ckpt_path=" in arg)
    assert OverridesParser.create().parse_override(resume).value() == str(stopped / "checkpoints" / "last.ckpt")
    assert resume.startswith("++ckpt_path=")
    assert command[-2:] == ["hydra.job.num=1", "hydra.job.id=1"]


def test_the_launcher_returns_failures_as_hydra_does(launcher, tmp_path):
    failed_job = launcher.job_return({"status": "failed", "error": "error: x=1: bad; fix: x=2"})
    assert failed_job.status == JobStatus.FAILED
    # By name: Hydra's plugin discovery may import hydra_plugins/ again, making a second JobFailed class.
    with pytest.raises(Exception, match="x=1: bad") as raised:
        _ = failed_job.return_value
    assert type(raised.value).__name__ == JobFailed.__name__
    no_metric = launcher.job_return({"status": "completed", "metrics": {}})
    assert no_metric.status == JobStatus.FAILED
    with pytest.raises(Exception, match="no val/acc_best") as raised:
        _ = no_metric.return_value
    assert type(raised.value).__name__ == JobFailed.__name__


def test_the_launcher_records_a_job_that_died_without_a_word(launcher, tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess_launcher, "run_teeing_stderr", lambda command: (-9, ["Killed"]))
    ret = launcher.run_job(["lr=1"], tmp_path / "0", 0, tmp_path)
    assert ret.status == JobStatus.FAILED
    assert read_record(tmp_path / "0") == {
        "overrides": ["lr=1"],
        "status": "failed",
        "error": "Killed",
        "wall_time_s": pytest.approx(0, abs=5),
    }


def test_the_launcher_stops_the_sweep_when_a_job_refuses_its_config(launcher, tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess_launcher, "run_teeing_stderr", lambda command: (2, ["error: x=1: bad; fix: x=2"]))
    with pytest.raises(SystemExit) as stop:
        launcher.run_job(["lr=1"], tmp_path / "0", 0, tmp_path)
    assert stop.value.code == 2
    assert not (tmp_path / "0" / "run.json").exists()


# Pieces behind the records: quoting, atomic checkpoints, summaries, predict's image conversion.


@pytest.mark.parametrize(
    "path", ["/tmp/plain/last.ckpt", "/tmp/it's here/a b.ckpt", r"C:\runs\x\last.ckpt", "/tmp/end\\"]
)
def test_quoted_paths_read_back_as_themselves(path):
    assert OverridesParser.create().parse_override(f"+ckpt_path={quoted(path)}").value() == path


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 1}, path)

    def crash_before_the_data_is_on_disk(fd):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoints.os, "fsync", crash_before_the_data_is_on_disk)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"epoch": 2}, path)

    assert torch.load(path) == {"epoch": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no partial file left behind


def test_summary_rows_mark_a_job_that_never_ended_as_interrupted(tmp_path):
    write_record(
        tmp_path / "0",
        {
            "overrides": ["task.optimizer.lr=0.01"],
            "status": "completed",
            "epochs": 3,
            "metrics": {"val/acc_best": 0.9, "test/acc": 0.89},
            "wall_time_s": 12.34,
        },
    )
    write_record(tmp_path / "1", {"overrides": ["task.optimizer.lr=0.1"], "status": "running"})
    (tmp_path / "10").mkdir()  # a job that died before writing anything
    (tmp_path / ".submitit").mkdir()

    rows = write_summary(tmp_path)

    assert [(row["job"], row["status"]) for row in rows] == [(0, "completed"), (1, "interrupted"), (10, "interrupted")]
    assert rows[0]["test acc"] == 0.89
    assert rows[0]["wall time (s)"] == 12.3
    assert summary_rows(tmp_path) == rows
    assert (tmp_path / "summary.md").read_text().count("\n") == 5
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert json.loads((tmp_path / "0" / "run.json").read_text())["epochs"] == 3


def mnist_like_digit() -> np.ndarray:
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[6:22, 12:16] = 255  # a "1", off centre
    digit[6:9, 9:12] = 200
    return digit


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_images_are_converted_as_mnist_was_made(mode):
    light_on_dark = Image.fromarray(np.kron(mnist_like_digit(), np.ones((5, 3), dtype=np.uint8)))  # 140x84, stretched
    dark_on_light = Image.fromarray(255 - np.asarray(light_on_dark)).convert(mode)

    for image in (light_on_dark, dark_on_light):
        pixels = to_mnist(image)
        assert pixels.shape == (28, 28)
        assert pixels.dtype == np.uint8
        rows, cols = np.nonzero(pixels > 25)
        assert max(np.ptp(rows), np.ptp(cols)) + 1 <= 20  # the digit fits in 20x20
        assert np.ptp(rows) + 1 >= 19  # and fills it along its longer side
        mass = pixels.astype(float)
        centre = (mass.sum(1) @ np.arange(28) / mass.sum(), mass.sum(0) @ np.arange(28) / mass.sum())
        assert centre == pytest.approx((14, 14), abs=0.75)
        assert pixels[0].max() == 0  # black background
    np.testing.assert_array_equal(to_mnist(light_on_dark), to_mnist(dark_on_light))
