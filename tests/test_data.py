import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from data_modules import MNISTDataModule
from mnist_extras import mnist_files
from mnist_extras.augment import AugmentedMNISTDataModule, random_warp
from mnist_extras.mnist_files import RAW_FILES, MNISTFiles, damaged_files, prepare_mnist

PROJECT_DIR = Path(__file__).parent.parent


def test_offline_source_builds_the_original_files_in_an_empty_folder(tmp_path, monkeypatch):
    def unreachable(folder):
        raise OSError("mirrors unreachable")

    monkeypatch.setattr(mnist_files, "download_with_torchvision", unreachable)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    prepare_mnist(raw)
    assert sorted(p.name for p in raw.iterdir() if not p.name.startswith(".")) == sorted(RAW_FILES)
    assert damaged_files(raw) == []  # every file has the original MD5
    assert not list(raw.glob(".partial-*"))


def test_two_runs_preparing_one_folder_at_once_both_succeed(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    code = "from pathlib import Path; from mnist_extras.mnist_files import prepare_mnist; "
    code += f"prepare_mnist(Path({str(raw)!r}))"
    runs = [subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_DIR, stderr=subprocess.PIPE) for _ in range(2)]
    for run in runs:
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err.decode()
    assert damaged_files(raw) == []


def test_the_file_checks_import_neither_torch_nor_torchvision():
    # Torch-free code (the config checks) reads RAW_FILES from mnist_files.
    code = "import sys, mnist_extras.mnist_files; "
    code += "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_DIR, capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr


def job_config(data_dir: object) -> OmegaConf:
    return OmegaConf.create({"data_module": {"data_dir": str(data_dir)}})


def test_a_relative_data_dir_is_taken_from_the_folder_the_command_runs_in(tmp_path, monkeypatch):
    prepared = []
    monkeypatch.setattr(mnist_files, "prepare_mnist", prepared.append)
    monkeypatch.chdir(tmp_path)
    MNISTFiles().on_job_start(job_config("./data/mnist"))
    assert [path.resolve() for path in prepared] == [tmp_path / "data" / "mnist" / "MNIST" / "raw"]
    assert MNISTDataModule(data_dir="./data/mnist").data_dir.resolve() == tmp_path / "data" / "mnist"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    MNISTFiles().on_job_start(job_config("~/mnist"))
    assert prepared[-1] == tmp_path / "home" / "mnist" / "MNIST" / "raw"


def test_a_job_hashes_the_data_once(mnist_dir, monkeypatch):
    import torchvision.datasets.utils

    hashed = []
    digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, kind: hashed.append(Path(f.name).name) or digest(f, kind))
    monkeypatch.setattr(torchvision.datasets.utils, "calculate_md5", lambda *a, **k: pytest.fail("hashed again"))
    MNISTFiles().on_job_start(job_config(mnist_dir))
    datamodule = MNISTDataModule(data_dir=str(mnist_dir))
    datamodule.prepare_data()  # torchvision sees the files and checks nothing more
    datamodule.setup()
    assert sorted(hashed) == sorted(RAW_FILES)


def test_a_damaged_file_in_a_read_only_folder_ends_in_one_line(tmp_path, mnist_dir, monkeypatch, capsys):
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    shutil.copytree(mnist_dir / "MNIST" / "raw", raw, ignore=shutil.ignore_patterns(".*"))
    damaged = raw / "t10k-labels-idx1-ubyte"
    damaged.write_bytes(damaged.read_bytes()[:100])

    def read_only(path, **kwargs):  # what a read-only mount answers, even to root
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(mnist_files, "FileLock", read_only)
    with pytest.raises(SystemExit) as stop:
        MNISTFiles().on_job_start(job_config(tmp_path / "mnist"))
    assert stop.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: MNIST in {raw}: t10k-labels-idx1-ubyte (truncated: 100 of 10008 bytes)")
    assert "cannot be written to rebuild it (Read-only file system)" in line
    assert "fix: copy the original files t10k-labels-idx1-ubyte into" in line
    assert ".lock" not in line


@pytest.fixture(scope="module")
def mnist(mnist_dir: Path) -> MNISTDataModule:
    datamodule = MNISTDataModule(data_dir=str(mnist_dir), batch_size=64, drop_last=True)
    datamodule.setup()
    return datamodule


def test_split_is_55000_5000_and_the_official_test_set(mnist):
    assert (len(mnist.train_set), len(mnist.val_set), len(mnist.test_set)) == (55_000, 5_000, 10_000)
    images, _ = mnist.train_set.tensors
    assert images.dtype == torch.uint8
    assert images.shape[1:] == (1, 28, 28)
    for split in (mnist.train_set, mnist.val_set, mnist.test_set):  # every digit in every split
        share = torch.bincount(split.tensors[1], minlength=10).float() / len(split)
        assert share.min() > 0.08
        assert share.max() < 0.12


def test_split_is_fixed_and_disjoint(mnist, mnist_dir):
    again = MNISTDataModule(data_dir=str(mnist_dir))
    again.setup()
    assert torch.equal(again.val_set.tensors[0], mnist.val_set.tensors[0])
    train = {bytes(x.numpy()) for x in mnist.train_set.tensors[0][:5000]}
    assert not train & {bytes(x.numpy()) for x in mnist.val_set.tensors[0][:500]}


def test_training_batches_honour_batch_size_and_drop_last(mnist):
    loader = mnist.train_dataloader()
    assert len(loader) == 55_000 // 64
    images, labels = next(iter(loader))
    assert (images.shape, images.dtype, labels.shape) == ((64, 1, 28, 28), torch.uint8, (64,))
    assert sum(len(y) for _, y in mnist.val_dataloader()) == 5_000  # evaluation keeps every sample
    first, second = next(iter(loader))[1], next(iter(loader))[1]
    assert not torch.equal(first, second)  # a new order each epoch


def test_batches_are_normalised_after_transfer_and_the_example_input_passes_as_it_is(mnist):
    images, _ = mnist.train_set.tensors
    normalised, _ = mnist.on_after_batch_transfer((images[:10_000], None), 0)
    assert normalised.dtype == torch.float32
    assert abs(normalised.mean().item()) < 0.02
    assert abs(normalised.std().item() - 1) < 0.02
    example = torch.zeros(2, 1, 28, 28)
    assert mnist.on_after_batch_transfer(example, 0) is example  # Lightning's model summary input


def test_num_workers_is_honoured(mnist_dir):
    datamodule = MNISTDataModule(data_dir=str(mnist_dir), num_workers=2)
    datamodule.setup()
    assert datamodule.train_dataloader().num_workers == 2
    assert datamodule.test_dataloader().num_workers == 2


@pytest.mark.parametrize(
    "accelerator",
    ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))],
)
def test_on_device_keeps_the_set_on_the_runs_device_and_cuts_the_same_batches_there(mnist_dir, accelerator):
    import pytorch_lightning as pl

    def first_batch(on_device):
        datamodule = MNISTDataModule(data_dir=str(mnist_dir), batch_size=32, pin_memory=True, on_device=on_device)
        datamodule.trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False)
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        torch.manual_seed(0)
        return datamodule, loader, next(iter(loader))

    datamodule, loader, (images, labels) = first_batch(on_device=True)
    device = datamodule.trainer.strategy.root_device
    assert datamodule.train_set.tensors[0].device == device
    assert (images.device, labels.device) == (device, device)  # cut where the set lives: nothing to copy
    assert not loader.pin_memory  # pinning is for host memory
    _, _, (host_images, host_labels) = first_batch(on_device=False)
    assert torch.equal(images.cpu(), host_images)
    assert torch.equal(labels.cpu(), host_labels)


def test_by_default_the_set_stays_in_host_memory_without_a_gpu(mnist_dir):
    import pytorch_lightning as pl

    datamodule = MNISTDataModule(data_dir=str(mnist_dir))
    datamodule.trainer = pl.Trainer(accelerator="cpu", logger=False)
    assert not datamodule.keeps_set_on_device()


# Augmentation (mnist_extras/augment.py)


def test_random_warp_moves_each_digit_and_keeps_the_border_black():
    images = torch.zeros(8, 1, 28, 28)
    images[:, :, 10:18, 12:16] = 255.0
    moved = random_warp(images, generator=torch.Generator().manual_seed(0))
    assert moved.shape == images.shape
    assert not torch.equal(moved[0], moved[1])  # each image gets its own transform
    assert moved[:, :, 0, :].abs().max() == 0  # nothing bleeds in from outside
    assert moved.sum() == pytest.approx(images.sum(), rel=0.25)  # the digit stays in view


def test_elastic_warp_bends_each_digit_on_top_of_the_same_affine_move():
    images = torch.zeros(8, 1, 28, 28)
    images[:, :, 8:20, 12:16] = 255.0
    moved = random_warp(images, generator=torch.Generator().manual_seed(0))
    bent = random_warp(images, elastic=1.0, generator=torch.Generator().manual_seed(0))
    assert (bent - moved).abs().amax(dim=(1, 2, 3)).min() > 0  # every digit is bent
    assert bent[:, :, 0, :].abs().max() == 0
    assert bent.sum().item() == pytest.approx(moved.sum().item(), rel=0.15)  # bent, not torn or smeared away


def stand_in_trainer(rank: int = 0, training: bool = True, step: int = 0) -> SimpleNamespace:
    """What the data module reads of its trainer, for one process of a DDP run."""
    return SimpleNamespace(training=training, global_rank=rank, world_size=2, global_step=step)


def digits(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 8:20, 12:16] = 255
    return images, torch.arange(n) % 10


def augmented(rank: int = 0, **trainer: object) -> AugmentedMNISTDataModule:
    datamodule = AugmentedMNISTDataModule(augment=True, elastic=1.0)
    datamodule.trainer = stand_in_trainer(rank, **trainer)
    return datamodule


def test_augmentation_applies_to_training_batches_only():
    datamodule = augmented(training=False)
    plain = datamodule.on_after_batch_transfer(digits(), 0)[0]
    datamodule.trainer.training = True
    warped = datamodule.on_after_batch_transfer(digits(), 0)[0]
    assert not torch.equal(plain, warped)
    assert not torch.equal(warped, datamodule.on_after_batch_transfer(digits(), 0)[0])  # fresh each time
    datamodule.trainer.training = False
    assert torch.equal(plain, datamodule.on_after_batch_transfer(digits(), 0)[0])
    example = torch.zeros(2, 1, 28, 28)
    datamodule.trainer.training = True
    assert datamodule.on_after_batch_transfer(example, 0) is example


def test_each_rank_draws_its_own_warps_from_the_same_seed():
    draws = []
    for rank in (0, 1):
        torch.manual_seed(7)  # seed_everything gives every rank the same seed
        draws.append(augmented(rank).on_after_batch_transfer(digits(), 0)[0])
    assert not torch.equal(draws[0], draws[1])
    torch.manual_seed(7)
    assert torch.equal(augmented(0).on_after_batch_transfer(digits(), 0)[0], draws[0])  # and repeat


def test_a_resumed_run_draws_what_the_uninterrupted_one_would_have():
    torch.manual_seed(3)
    first = augmented()
    first.on_after_batch_transfer(digits(), 0)
    state = first.state_dict()  # what the checkpoint written after that batch holds
    expected = first.on_after_batch_transfer(digits(), 0)[0]
    torch.manual_seed(3)
    resumed = augmented(step=1)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.on_after_batch_transfer(digits(), 0)[0], expected)


def test_elastic_without_augment_says_once_that_it_does_nothing(mnist_dir, capsys, caplog):
    import logging

    caplog.set_level(logging.INFO)
    datamodule = AugmentedMNISTDataModule(data_dir=str(mnist_dir), elastic=1.0)
    datamodule.setup("fit")
    datamodule.setup("test")
    said = caplog.text + capsys.readouterr().out
    assert said.count("elastic=1.0 has no effect") == 1
