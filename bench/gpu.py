"""Training epoch time on a GPU, and the time to 99% there.

    python -m bench.gpu                                   # the whole table (about 10 minutes on one GPU)
    python -m bench.gpu --backbones resnet18 --no-compile # a quick look
    python -m bench.gpu --device cpu --steps 4 --backbones resnet18 --no-compile --time-to 0.3  # checks the script

Rows: ResNet18/34/50 x fp32 or bf16-mixed x contiguous or channels_last x eager or
`torch.compile`, each with the whole uint8 set kept on the GPU (`data_module.on_device=true`:
batches are cut there) and with pinned host batches copied over each step
(`on_device=false`). Each row times the second of two epochs of `--steps` steps (the first
compiles and warms up); a row is printed as soon as it is measured. Then the mnist_99 recipe with
the set on the device, validated four times an epoch, reports when val/acc first reached 99%.
"""

import argparse
import itertools
import logging
import time

import pytorch_lightning as pl
import torch
from hydra.utils import execution_whitelist, instantiate

from bench.fits import bare_trainer, recipe
from bench.machine import describe
from mnist_extras.errors import quiet_libraries
from mnist_extras.layers import CentreTaps, swap_centre_taps
from mnist_extras.speed import MeasuredSpeed
from train import TARGETS


class EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        synchronize(pl_module.device)
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        synchronize(pl_module.device)
        self.seconds.append(time.perf_counter() - self.start)


class TimeToAccuracy(pl.Callback):
    def __init__(self, goal: float) -> None:
        self.goal, self.reached = goal, None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        accuracy = trainer.callback_metrics.get("val/acc")
        if self.reached is None and not trainer.sanity_checking and accuracy is not None and accuracy >= self.goal:
            self.reached = (time.perf_counter() - self.start, trainer.global_step)


def mnist_99_with(backbone: str) -> list[str]:
    """mnist_99 with another ResNet as its backbone, with the recipe's stem and random weights."""
    return ["+experiment=mnist_99", f"task.model.backbone={backbone}", "task.model.backbone.pretrained=false",
            "++task.model.backbone.stem=digits"]  # fmt: skip


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_seconds(args, backbone: str, precision: str, channels_last: bool, compiled: bool, on_device: bool) -> float:
    cfg = recipe(*mnist_99_with(backbone), f"data_module.batch_size={args.batch_size}")
    pl.seed_everything(0, verbose=False)
    task = instantiate(cfg.task, compile=compiled)  # this row's settings, not measured ones
    swap_centre_taps(task)
    if channels_last:
        task.model.to(memory_format=torch.channels_last)
    timer = EpochTimer()
    run = bare_trainer(
        accelerator=args.device,
        precision=precision,
        callbacks=[timer],
        max_epochs=2,
        limit_train_batches=args.steps,
        limit_val_batches=0,
    )
    run.fit(task, datamodule=instantiate(cfg.data_module, on_device=on_device, pin_memory=True))
    return timer.seconds[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="gpu")
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None, help="steps an epoch (default: the whole set)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--time-to", type=float, default=0.99, help="val/acc to reach with mnist_99; 0 skips it")
    args = parser.parse_args()
    quiet_libraries()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # the table, not each fit's set-up lines
    print(describe())
    print(f"batch {args.batch_size}, {args.steps or 'all'} steps an epoch, second epoch timed\n")
    print(f"{'backbone':9} {'precision':11} {'layout':14} {'compile':8} {'data':7} {'epoch s':>8} {'img/s':>8}")
    steps = args.steps or 55_000 // args.batch_size
    compile_choices = [False] if args.no_compile else [False, True]
    rows = itertools.product(args.backbones, ["32-true", "bf16-mixed"], [False, True], compile_choices, [True, False])
    for backbone, precision, channels_last, compiled, on_device in rows:
        seconds = epoch_seconds(args, backbone, precision, channels_last, compiled, on_device)
        layout = "channels_last" if channels_last else "contiguous"
        data = "device" if on_device else "host"
        speed = steps * args.batch_size / seconds
        print(
            f"{backbone:9} {precision:11} {layout:14} {compiled!s:8} {data:7} {seconds:8.2f} {speed:8.0f}", flush=True
        )

    if args.time_to:
        cfg = recipe("+experiment=mnist_99")
        pl.seed_everything(0, verbose=False)
        goal = TimeToAccuracy(args.time_to)
        limit = args.steps or cfg.trainer.limit_train_batches
        run = bare_trainer(
            accelerator=args.device,
            callbacks=[CentreTaps(), MeasuredSpeed(), goal],  # callbacks=speed: the recipe as users run it
            max_epochs=cfg.trainer.max_epochs,
            val_check_interval=0.25,
            limit_train_batches=limit,
        )
        datamodule = instantiate(cfg.data_module, on_device=True)
        task = instantiate(cfg.task)
        run.fit(task, datamodule=datamodule)
        test = run.test(task, datamodule=datamodule, verbose=False)[0]["test/acc"]  # the last weights
        when = f"after {goal.reached[0]:.1f} s ({goal.reached[1]} steps)" if goal.reached else "never"
        print(f"\nmnist_99, set on the device: val/acc {args.time_to} reached {when}; test/acc {test:.4f} at the end")


if __name__ == "__main__":
    with execution_whitelist(TARGETS):  # what train.py lets a config name
        main()
