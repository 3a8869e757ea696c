"""Training throughput of trainer=ddp_cpu with 1 and 2 processes at the same global batch.

    python -m bench.ddp                          # resnet18, global batch 64, 1 and 2 processes
    python -m bench.ddp --processes 1 2 4 --global-batch 128

Each setting runs in a fresh `python -m bench.ddp --worker` (Lightning's DDP launcher starts the
other ranks by re-running that command), on the composed `trainer=ddp_cpu` config and the real
data module, so the distributed sampler, gloo's gradient all-reduce and Lightning's per-process
thread count (cores / processes) are all in the measurement. Timing starts after the warm-up
steps and stops at the end of training, on rank zero; validation and checkpoints are off.
`OMP_NUM_THREADS=1 python -m bench.ddp` gives every process one thread instead.
"""

import argparse
import json
import subprocess
import sys
import time

from hydra.utils import execution_whitelist

from train import TARGETS

RESULT = "bench.ddp result: "


def worker(args: argparse.Namespace) -> None:
    import pytorch_lightning as pl
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from train import CONFIG_DIR

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == args.warmup:
                self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module) -> None:
            seconds = time.perf_counter() - self.start
            if trainer.is_global_zero:
                images = args.steps * args.global_batch
                threads = torch.get_num_threads()  # as Lightning set it for this many processes
                print(RESULT + json.dumps({"threads": threads, "images_per_s": images / seconds}))

    overrides = ["trainer=ddp_cpu", f"trainer.devices={args.processes}", "task.model.backbone.pretrained=false"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="config", overrides=overrides)
    pl.seed_everything(0)
    task = instantiate(cfg.task)
    datamodule = instantiate(
        cfg.data_module, data_dir=args.data_dir, batch_size=args.global_batch // args.processes, num_workers=0
    )
    trainer = instantiate(
        cfg.trainer,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Timer()],
    )
    trainer.fit(task, datamodule=datamodule)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--data-dir", default="./data/mnist")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.processes = args.processes[0]
        worker(args)
        return

    from bench.machine import describe

    print(describe())
    rate, threads = {}, {}
    for processes in args.processes:
        command = [sys.executable, "-m", "bench.ddp", "--worker", "--processes", str(processes)]
        command += ["--global-batch", str(args.global_batch), "--steps", str(args.steps)]
        command += ["--warmup", str(args.warmup), "--data-dir", args.data_dir]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        line = next(line for line in out.splitlines() if line.startswith(RESULT))
        result = json.loads(line.removeprefix(RESULT))
        rate[processes], threads[processes] = result["images_per_s"], result["threads"]

    base = rate[args.processes[0]]
    print(f"\nresnet18, trainer=ddp_cpu, global batch {args.global_batch}, {args.steps} timed steps")
    print(f"{'processes':>9} {'threads each':>12} {'batch each':>10} {'images/s':>9} {'x 1st':>6} {'efficiency':>10}")
    for processes, images_per_s in rate.items():
        speedup = images_per_s / base
        efficiency = speedup * args.processes[0] / processes
        print(
            f"{processes:9d} {threads[processes]:12d} {args.global_batch // processes:10d} {images_per_s:9.0f} "
            f"{speedup:6.2f} {efficiency:10.2f}"
        )


if __name__ == "__main__":
    with execution_whitelist(TARGETS):  # what train.py lets a config name
        main()
