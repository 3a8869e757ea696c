"""MNIST as a LightningDataModule, kept in memory as uint8 and normalised a batch at a time."""

import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import CUDAAccelerator
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import MNIST

MEAN, STD = 0.1307, 0.3081
VAL_SIZE, SPLIT_SEED = 5_000, 12345


class MNISTDataModule(pl.LightningDataModule):
    """MNIST: 55,000 train / 5,000 validation (a fixed, seeded split) / the official 10,000 test.

    Files in torchvision's layout, `<data_dir>/MNIST/raw/`. Batches stay uint8 until the device, where
    `on_after_batch_transfer` normalises them. `batch_size` is per process. `on_device` (by default on
    with a GPU) keeps the whole set (47 MB) on the device and cuts batches there: none crosses the bus.
    """

    def __init__(
        self,
        data_dir: str | Path = "./data/mnist",
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = True,
        on_device: bool | None = None,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.on_device = on_device
        self.train_set: TensorDataset | None = None

    def prepare_data(self) -> None:
        for train in (True, False):
            MNIST(self.data_dir, train=train, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:  # fit and test both call setup: read the files once
            return
        train, test = MNIST(self.data_dir, train=True), MNIST(self.data_dir, train=False)
        order = torch.randperm(len(train.targets), generator=torch.Generator().manual_seed(SPLIT_SEED))
        images, labels = train.data.unsqueeze(1), train.targets
        val, fit = order[:VAL_SIZE], order[VAL_SIZE:]
        sets = [(images[fit], labels[fit]), (images[val], labels[val]), (test.data.unsqueeze(1), test.targets)]
        if self.keeps_set_on_device():
            device = self.trainer.strategy.root_device
            rank_zero_info(f"MNIST is kept on {device}: batches are cut there (data_module.on_device=false to stop)")
            sets = [(x.to(device), y.to(device)) for x, y in sets]
            self.train_set, self.val_set, self.test_set = (DeviceTensors(*pair) for pair in sets)
        else:
            self.train_set, self.val_set, self.test_set = (TensorDataset(*pair) for pair in sets)

    def keeps_set_on_device(self) -> bool:
        if self.trainer is None:
            return False
        return isinstance(self.trainer.accelerator, CUDAAccelerator) if self.on_device is None else self.on_device

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_set, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.test_set)

    def loader(self, dataset: TensorDataset, shuffle: bool = False, drop_last: bool = False) -> DataLoader:
        if isinstance(dataset, DeviceTensors):
            settings = {"collate_fn": DeviceTensors.collate}
        else:
            workers = min(self.num_workers, len(os.sched_getaffinity(0)))  # more than the cores only contend for them
            settings = {"num_workers": workers, "persistent_workers": workers > 0}
            settings["pin_memory"] = self.pin_memory and torch.cuda.is_available()
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, drop_last=drop_last, **settings)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        if isinstance(batch, Tensor):  # the task's example_input_array, on its way to Lightning's model summary
            return batch
        images, labels = batch
        return normalize(images), labels


def normalize(images: Tensor) -> Tensor:
    """Pixels in [0, 255] (uint8 or float) -> float32 with MNIST's mean 0 and standard deviation 1."""
    return images.float().sub_(MEAN * 255).div_(STD * 255)


class DeviceTensors(TensorDataset):
    """A TensorDataset whose DataLoader takes a whole batch in one indexing operation, on the
    tensors' device (the DataLoader hands `__getitems__` the batch's indices)."""

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, ...]:
        index = torch.as_tensor(indices, device=self.tensors[0].device)
        return tuple(tensor[index] for tensor in self.tensors)

    @staticmethod
    def collate(batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return batch
