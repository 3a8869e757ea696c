"""Training batches/s: MNISTDataModule against torchvision's MNIST + ToTensor/Normalize + DataLoader.

    python -m bench.data                 # needs ./data/mnist (python train.py prepares it)

Both give normalised float batches of the same size from the same files, shuffled, in one
process; the data module is also run with the spec's num_workers values, which must not slow it.
"""

import argparse
import time

import torch
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import MNIST

from bench.machine import describe
from data_modules import MEAN, STD, MNISTDataModule


def batches_per_second(loader, to_batch, limit: int) -> float:
    iterator = iter(loader)
    to_batch(next(iterator))  # worker start-up is not per-batch cost; the epoch table shows it
    start = time.perf_counter()
    count = 0
    for batch in iterator:
        to_batch(batch)
        count += 1
        if count == limit:
            break
    return count / (time.perf_counter() - start)


def epoch_seconds(loader, to_batch) -> float:
    start = time.perf_counter()
    for batch in loader:
        to_batch(batch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default="./data/mnist")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args()
    print(describe())
    torch.manual_seed(0)

    to_normalised_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    reference = DataLoader(
        MNIST(args.data_dir, train=True, transform=to_normalised_tensor),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
    )
    ours = {}
    for workers in (0, 2, 8):
        datamodule = MNISTDataModule(args.data_dir, batch_size=args.batch_size, num_workers=workers)
        datamodule.setup()
        ours[workers] = (datamodule.train_dataloader(), lambda b, dm=datamodule: dm.on_after_batch_transfer(b, 0))

    def keep(batch):
        return batch

    reference_rate = batches_per_second(reference, keep, args.batches)
    print(f"\nbatch {args.batch_size}, {args.batches} batches after the first")
    print(f"{'loader':38} {'batches/s':>10} {'x torchvision':>14}")
    print(f"{'torchvision MNIST + ToTensor/Normalize':38} {reference_rate:10.0f} {1:14.1f}")
    rates = {}
    for workers, (loader, to_batch) in ours.items():
        # Measure a batch count the in-memory loader needs long enough to time well.
        rates[workers] = batches_per_second(loader, to_batch, 100 * args.batches)
        name = f"MNISTDataModule, num_workers={workers}"
        print(f"{name:38} {rates[workers]:10.0f} {rates[workers] / reference_rate:14.1f}")

    print("\nwhole training epoch (55,000 images), worker start-up included")
    print(f"{'loader':38} {'seconds':>10}")
    for workers, (loader, to_batch) in ours.items():
        first = epoch_seconds(loader, to_batch)
        second = epoch_seconds(loader, to_batch)
        print(f"{'MNISTDataModule, num_workers=' + str(workers):38} {first:10.2f} (next epoch {second:.2f})")


if __name__ == "__main__":
    main()
