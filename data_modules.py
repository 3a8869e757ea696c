"""MNIST as a LightningDataModule, kept in memory as uint8 and normalised a batch at a time.

Getting the files onto disk (checking, rebuilding, locking) lives in mnist_files.py.
"""

from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.accelerators import CUDAAccelerator
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler
from torchvision.datasets.mnist import read_image_file, read_label_file

import mnist_files

MEAN, STD = 0.1307, 0.3081
VAL_SIZE, SPLIT_SEED = 5_000, 12345


class MNISTDataModule(pl.LightningDataModule):
    """MNIST: 55,000 train / 5,000 validation (a fixed, seeded split) / the official 10,000 test.

    Batches are `(uint8 images (B, 1, 28, 28), int64 labels (B,))` until they reach the device,
    where `on_after_batch_transfer` normalises them, so the CPU only slices one tensor.
    `augment=True` moves, turns and scales each training digit a little, a batch at a time;
    `elastic` (in pixels) adds a smooth random bend on top, as handwriting varies (Simard et al. 2003).
    `data_dir` may start with `~`; a relative one is taken from the project folder.
    `on_device` keeps the whole uint8 set (47 MB) on the run's device and cuts batches there, so no
    batch crosses the PCIe bus; by default it is on when the run has a GPU (on the CPU it changes
    nothing, since the set is already where the model is).

    `num_workers` starts no processes here: with the set in memory a worker has nothing to load,
    and shipping its batches back through shared memory made an epoch 14x slower
    (bench/data.py), so batches are always cut in the main process.
    """

    def __init__(
        self,
        data_dir: str | Path = "./data/mnist",
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = True,
        augment: bool = False,
        elastic: float = 0.0,
        on_device: bool | None = None,
    ) -> None:
        super().__init__()
        self.data_dir = mnist_files.data_dir_path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers  # see the class docstring: not used for the in-memory set
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.augment = augment
        self.elastic = elastic
        self.on_device = on_device

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "MNIST" / "raw"

    def prepare_data(self) -> None:
        mnist_files.prepare_mnist(self.raw_dir)

    def setup(self, stage: str | None = None) -> None:
        self.say_what_has_no_effect()
        images = read_image_file(str(self.raw_dir / "train-images-idx3-ubyte")).unsqueeze(1)
        labels = read_label_file(str(self.raw_dir / "train-labels-idx1-ubyte"))
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
        val, train = order[:VAL_SIZE], order[VAL_SIZE:]
        self.train_set = InMemoryDigits(images[train], labels[train])
        self.val_set = InMemoryDigits(images[val], labels[val])
        self.test_set = InMemoryDigits(
            read_image_file(str(self.raw_dir / "t10k-images-idx3-ubyte")).unsqueeze(1),
            read_label_file(str(self.raw_dir / "t10k-labels-idx1-ubyte")),
        )
        if self.keeps_set_on_device():
            device = self.trainer.strategy.root_device
            for dataset in (self.train_set, self.val_set, self.test_set):
                dataset.images, dataset.labels = dataset.images.to(device), dataset.labels.to(device)

    def train_dataloader(self) -> DataLoader:
        # Under trainer.overfit_batches the same first batches come every epoch. Lightning turns
        # shuffling off by looking at the loader's `sampler`, which beside a batch sampler is a
        # SequentialSampler whatever the batch sampler draws from, so it would miss this one.
        overfit = self.trainer is not None and self.trainer.overfit_batches > 0
        return self._loader(self.train_set, shuffle=not overfit, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def keeps_set_on_device(self) -> bool:
        if self.trainer is None:
            return False
        return self.on_device if self.on_device is not None else self.on_gpu()

    def on_gpu(self) -> bool:
        return self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)

    def say_what_has_no_effect(self) -> None:
        """One line per setting that the config shows but that changes nothing in this run (once: setup
        runs for fit and again for test)."""
        if getattr(self, "_said", False):
            return
        self._said = True
        if self.num_workers:
            rank_zero_info(
                f"num_workers={self.num_workers} starts no processes: MNIST is in memory and batches are cut "
                "in the main process, which bench/data.py measured 14x faster than workers"
            )
        if self.pin_memory and not self.on_gpu():
            rank_zero_info("pin_memory=true has no effect: it speeds up copies to a GPU, and this run has none")
        elif self.pin_memory and self.keeps_set_on_device():
            rank_zero_info("pin_memory=true has no effect: the whole set is on the GPU, so no batch is copied there")
        if self.elastic and not self.augment:
            rank_zero_info(f"elastic={self.elastic} has no effect: digits are bent only with augment=true")

    def _loader(self, dataset: "InMemoryDigits", shuffle: bool = False, drop_last: bool = False) -> DataLoader:
        order = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
        return DataLoader(
            dataset,
            batch_sampler=IndexTensorBatchSampler(order, self.batch_size, drop_last),
            pin_memory=self.pin_memory and self.on_gpu() and not self.keeps_set_on_device(),
            collate_fn=InMemoryDigits.collate,
        )

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        images, labels = batch
        images = images.float()
        if self.augment and self.trainer is not None and self.trainer.training:
            images = random_warp(images, elastic=self.elastic)
        return normalize(images), labels


def normalize(images: Tensor) -> Tensor:
    """Pixels in [0, 255] (uint8 or float) -> float32 with MNIST's mean 0 and standard deviation 1."""
    return images.float().sub_(MEAN * 255).div_(STD * 255)


def random_warp(
    images: Tensor, degrees: float = 10.0, shift: float = 0.1, scale: float = 0.1, elastic: float = 0.0
) -> Tensor:
    """Each image of a float batch (B, 1, H, W) rotated by up to `degrees`, shifted by up to `shift`
    of its size, scaled by 1 +- `scale` and bent by a smooth field of about `elastic` pixels, in one
    `grid_sample` call; the border stays black."""
    batch, _, height, width = images.shape
    angle = torch.empty(batch, device=images.device).uniform_(-degrees, degrees).deg2rad_()
    zoom = torch.empty(batch, device=images.device).uniform_(1 - scale, 1 + scale)
    offset = torch.empty(batch, 2, device=images.device).uniform_(-2 * shift, 2 * shift)  # grid spans [-1, 1]
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    if elastic:
        # Random displacements on a 4x4 lattice, interpolated to every pixel: smooth over about a
        # quarter of the digit, as a Gaussian-filtered noise field would be, at a fraction of the cost.
        coarse = torch.randn(batch, 2, 4, 4, device=images.device) * elastic
        field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)
        grid = grid + field.permute(0, 2, 3, 1) * (2 / torch.tensor([width, height], device=images.device))
    return F.grid_sample(images, grid, align_corners=False)


class InMemoryDigits(Dataset):
    """Images and labels as two tensors. The DataLoader hands `__getitems__` a whole batch of
    indices, so a batch costs one indexing operation instead of `batch_size` item calls."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: Tensor | list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices, device=self.images.device)
        return self.images[index], self.labels[index]

    @staticmethod
    def collate(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return batch


class IndexTensorBatchSampler(BatchSampler):
    """A BatchSampler that reads its sampler's order once an epoch (one permutation when
    shuffling) and yields slices of it as index tensors, instead of building a list of ints per
    batch. Lightning can still swap in a DistributedSampler: it rebuilds batch samplers from
    (sampler, batch_size, drop_last)."""

    def __iter__(self) -> Iterator[Tensor]:
        order = torch.as_tensor(list(self.sampler))
        batches = order.split(self.batch_size)
        if self.drop_last and len(order) % self.batch_size:
            batches = batches[:-1]
        yield from batches
