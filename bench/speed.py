"""callbacks=speed (MeasuredSpeed) against each fixed setting: the same short training, timed side by side.

    python -m bench.speed                            # resnet18, batch 256, 40 steps, 2 rounds
    python -m bench.speed --backbone resnet50 --steps 20

Each variant trains the mnist_99 recipe for `--steps` steps with `trainer.fit` (no validation,
checkpoints or logger); rounds interleave the variants so the machine's noise falls on all alike.
`auto, measuring` starts with an empty cache, so its time includes the measurement; `auto, cached`
reads the choice the first one stored, as every later run on the machine does.
"""

import argparse
import logging
import os
import statistics
import tempfile
import time

import pytorch_lightning as pl
import torch
from hydra.utils import execution_whitelist, instantiate

from bench.fits import bare_trainer, recipe
from bench.gpu import mnist_99_with
from bench.machine import describe
from mnist_extras.errors import quiet_libraries
from mnist_extras.layers import swap_centre_taps
from mnist_extras.speed import MeasuredSpeed, Setting, read_cache
from train import TARGETS

FIXED = {
    "32-true": ("32-true", False),
    "32-true + channels_last": ("32-true", True),
    "bf16-mixed": ("bf16-mixed", False),
    "bf16-mixed + channels_last": ("bf16-mixed", True),
}


def fit_seconds(backbone: str, batch_size: int, steps: int, precision: str, channels_last: bool, auto: bool) -> float:
    cfg = recipe(*mnist_99_with(backbone), f"data_module.batch_size={batch_size}")
    pl.seed_everything(0, verbose=False)
    task = instantiate(cfg.task)
    swap_centre_taps(task)  # as the recipe's callbacks do
    if channels_last:
        task.model.to(memory_format=torch.channels_last)
    callbacks = [MeasuredSpeed()] if auto else []
    trainer = bare_trainer(precision=precision, max_steps=steps, limit_val_batches=0, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(task, datamodule=instantiate(cfg.data_module))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    quiet_libraries()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # the table, not each fit's set-up lines
    logging.getLogger("mnist_extras.speed").setLevel(logging.WARNING)
    print(describe())
    print(
        f"{args.backbone}, batch {args.batch_size}, {args.steps} steps of trainer.fit, median of {args.rounds} rounds"
    )
    with tempfile.TemporaryDirectory() as cache_root:
        os.environ["XDG_CACHE_HOME"] = cache_root  # this benchmark's own cache, empty at first
        times: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for name, (precision, channels_last) in FIXED.items():
                run = fit_seconds(args.backbone, args.batch_size, args.steps, precision, channels_last, auto=False)
                times.setdefault(name, []).append(run)
            MeasuredSpeed().cache.unlink(missing_ok=True)
            times.setdefault("auto, measuring", []).append(
                fit_seconds(args.backbone, args.batch_size, args.steps, "32-true", False, auto=True)
            )
            times.setdefault("auto, cached", []).append(
                fit_seconds(args.backbone, args.batch_size, args.steps, "32-true", False, auto=True)
            )
        entries = list(read_cache(MeasuredSpeed().cache).values())  # none if the last timings disagreed
    base = statistics.median(times["32-true"])
    print(f"{'setting':28} {'fit s':>7} {'x 32-true':>10}")
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"{name:28} {median:7.1f} {base / median:10.2f}")
    for entry in entries:
        print(f"\nauto chose {Setting(**entry['choice'])}, measured {entry['measured']}: {entry['why']}")
    if not entries:
        print("\nauto cached nothing: its timings disagreed, so both auto runs measured and ran 32-true")


if __name__ == "__main__":
    with execution_whitelist(TARGETS):  # what train.py lets a config name
        main()
