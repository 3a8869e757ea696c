"""What Lightning adds per step: trainer.fit over N steps against the same task in a bare loop.

    python -m bench.loop                 # resnet18, CPU, 300 steps of batch 64, 3 rounds

Both run the spec's task (ResNet18, Adam) on the same real MNIST batches; the Lightning side
runs as train.py configures it (progress bar, CSV logger, logging every 10 steps, metrics), with
validation and checkpointing off since the bare loop has neither.
"""

import argparse
import statistics
import tempfile
import time
from functools import partial

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from adapters import LinearAdapter
from backbones import ResNet18
from bench.machine import describe
from data_modules import MNISTDataModule, normalize
from heads import IdentityHead
from loss_functions import CrossEntropyLoss
from mnist_extras.tracking import ProgressLines
from models import SimpleModel
from tasks import MNISTClassification


class Replay:
    """The same batches again; a plain list would be read by Lightning as a list of loaders."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def new_task() -> MNISTClassification:
    torch.manual_seed(0)
    model = SimpleModel(ResNet18(), LinearAdapter(512, 10), IdentityHead())
    optimizer = partial(torch.optim.Adam, lr=5e-5, weight_decay=0.2)  # the spec's adam.yaml
    return MNISTClassification(model, optimizer, CrossEntropyLoss())


def bare(batches) -> float:
    start = time.perf_counter()
    task = new_task()
    optimizer = task.configure_optimizers()
    task.train()
    for images, labels in batches:
        images = normalize(images)
        logits = task.model(images)
        loss = task.loss_function(logits, labels)
        task.train_acc.update(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def lightning(batches, log_dir: str, extras: bool = True) -> float:
    """`extras`: train.py's progress display and CSV logger; without them, Lightning's bare loop."""

    class Batches(MNISTDataModule):
        def train_dataloader(self):
            return Replay(batches)

    start = time.perf_counter()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(batches),
        log_every_n_steps=10,
        logger=CSVLogger(log_dir) if extras else False,
        callbacks=[ProgressLines()] if extras else [],
        enable_progress_bar=extras,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(new_task(), datamodule=Batches())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default="./data/mnist")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(describe())
    datamodule = MNISTDataModule(args.data_dir, batch_size=64)
    datamodule.setup()
    iterator = iter(datamodule.train_dataloader())
    batches = [next(iterator) for _ in range(args.steps)]

    times = {"bare": [], "lightning": [], "lightning, no logger or progress": []}
    with tempfile.TemporaryDirectory() as log_dir:
        for _ in range(args.rounds):
            times["bare"].append(bare(batches))
            times["lightning"].append(lightning(batches, log_dir))
            times["lightning, no logger or progress"].append(lightning(batches, log_dir, extras=False))
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"\nresnet18, batch 64, {args.steps} steps, median of {args.rounds} interleaved rounds")
    print(f"{'loop':34} {'seconds':>8} {'ms/step':>8} {'x bare':>7}")
    for name, seconds in median.items():
        print(f"{name:34} {seconds:8.2f} {1000 * seconds / args.steps:8.1f} {seconds / median['bare']:7.3f}")
    print(f"ratio lightning / bare: {median['lightning'] / median['bare']:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
