import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist_extras import mnist_files
from mnist_extras.errors import PROJECT_DIR
from data_modules import MNISTDataModule
from mnist_extras.mnist_files import RAW_FILES, damaged_files


def test_offline_source_builds_the_original_files_in_an_empty_folder(tmp_path, monkeypatch):
    def unreachable(folder):
        raise OSError("mirrors unreachable")

    monkeypatch.setattr(mnist_files, "download_with_torchvision", unreachable)
    MNISTDataModule(data_dir=str(tmp_path / "mnist")).prepare_data()

    raw = tmp_path / "mnist" / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir() if not p.name.startswith(".")) == sorted(RAW_FILES)
    assert damaged_files(raw) == []  # every file has the original MD5
    assert not list(raw.glob(".partial-*"))


def test_two_runs_preparing_one_folder_at_once_both_succeed(tmp_path):
    code = f"from data_modules import MNISTDataModule; MNISTDataModule(data_dir={str(tmp_path)!r}).prepare_data()"
    runs = [subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_DIR, stderr=subprocess.PIPE) for _ in range(2)]
    for run in runs:
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err.decode()
    assert damaged_files(tmp_path / "MNIST" / "raw") == []


def test_the_file_checks_import_neither_torch_nor_torchvision():
    # validation.py and other torch-free code read RAW_FILES from mnist_files.
    code = "import sys, mnist_files; print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_DIR, capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr


def test_data_dir_expands_home_and_takes_relative_paths_from_the_project(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # the working directory plays no part
    assert MNISTDataModule(data_dir="~/mnist").raw_dir == tmp_path / "home" / "mnist" / "MNIST" / "raw"
    assert MNISTDataModule(data_dir="./data/mnist").data_dir == PROJECT_DIR / "data" / "mnist"
    assert MNISTDataModule(data_dir="../shared/mnist").data_dir == PROJECT_DIR / ".." / "shared" / "mnist"
    assert MNISTDataModule(data_dir=str(tmp_path / "mnist")).data_dir == tmp_path / "mnist"


@pytest.fixture(scope="module")
def mnist(mnist_dir: Path) -> MNISTDataModule:
    datamodule = MNISTDataModule(data_dir=str(mnist_dir), batch_size=64, drop_last=True)
    datamodule.setup()
    return datamodule


def test_split_is_55000_5000_and_the_official_test_set(mnist):
    assert (len(mnist.train_set), len(mnist.val_set), len(mnist.test_set)) == (55_000, 5_000, 10_000)
    assert mnist.train_set.images.dtype == torch.uint8
    assert mnist.train_set.images.shape[1:] == (1, 28, 28)
    # Every digit is in every split, in roughly MNIST's proportions.
    for split in (mnist.train_set, mnist.val_set, mnist.test_set):
        share = torch.bincount(split.labels, minlength=10).float() / len(split)
        assert share.min() > 0.08
        assert share.max() < 0.12


def test_split_is_fixed_and_disjoint(mnist, mnist_dir):
    again = MNISTDataModule(data_dir=str(mnist_dir))
    again.setup()
    assert torch.equal(again.val_set.images, mnist.val_set.images)
    train = {bytes(x.numpy()) for x in mnist.train_set.images[:5000]}
    assert not train & {bytes(x.numpy()) for x in mnist.val_set.images[:500]}


def test_training_batches_honour_batch_size_and_drop_last(mnist):
    loader = mnist.train_dataloader()
    assert len(loader) == 55_000 // 64
    images, labels = next(iter(loader))
    assert images.shape == (64, 1, 28, 28)
    assert images.dtype == torch.uint8
    assert labels.shape == (64,)
    assert sum(len(y) for _, y in mnist.val_dataloader()) == 5_000  # evaluation keeps every sample


def test_shuffling_draws_a_new_order_each_epoch(mnist):
    loader = mnist.train_dataloader()
    first, second = next(iter(loader))[1], next(iter(loader))[1]
    assert not torch.equal(first, second)


def test_batches_are_normalised_after_transfer(mnist):
    images, labels = mnist.on_after_batch_transfer(
        (mnist.train_set.images[:10_000], mnist.train_set.labels[:10_000]), 0
    )
    assert images.dtype == torch.float32
    assert abs(images.mean().item()) < 0.02
    assert abs(images.std().item() - 1) < 0.02


def test_an_epoch_visits_every_training_image_once(mnist_dir):
    datamodule = MNISTDataModule(data_dir=str(mnist_dir), batch_size=1000, drop_last=False)
    datamodule.setup()
    order = torch.cat([index for index in datamodule.train_dataloader().batch_sampler])
    assert torch.equal(order.sort().values, torch.arange(55_000))
    assert len(datamodule.train_dataloader()) == 55


def test_worker_processes_are_not_started_for_the_in_memory_set(mnist_dir):
    datamodule = MNISTDataModule(data_dir=str(mnist_dir), num_workers=8)
    datamodule.setup()
    assert datamodule.train_dataloader().num_workers == 0
    assert datamodule.test_dataloader().num_workers == 0


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
    assert datamodule.train_set.images.device == device
    assert datamodule.test_set.labels.device == device
    assert (images.device, labels.device) == (device, device)  # cut where the set lives: nothing to copy
    assert not loader.pin_memory  # pinning is for host memory
    _, host_loader, (host_images, host_labels) = first_batch(on_device=False)
    assert torch.equal(images.cpu(), host_images)
    assert torch.equal(labels.cpu(), host_labels)
    assert host_loader.pin_memory == (accelerator == "gpu")


def test_by_default_the_set_stays_in_host_memory_without_a_gpu(mnist_dir):
    import pytorch_lightning as pl

    datamodule = MNISTDataModule(data_dir=str(mnist_dir))
    datamodule.trainer = pl.Trainer(accelerator="cpu", logger=False)
    assert not datamodule.keeps_set_on_device()
