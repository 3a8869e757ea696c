"""How a training epoch's time grows with batch size and backbone depth.

    python -m bench.scaling              # 3 backbones x 4 batch sizes, CPU, a few minutes

Epoch time is estimated from the median of timed training steps (55,000 images an epoch);
the full loop adds under 5% (bench/loop.py).
"""

import argparse
import statistics
import time

import torch

from bench.compute import BACKBONES, build, step_fn
from bench.machine import describe

TRAIN_IMAGES = 55_000


def cell(seconds: float, base: float) -> str:
    return f"{seconds:8.0f} ({seconds / base:4.1f}x)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 128, 256, 512])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(describe())
    seconds = {}
    for backbone in args.backbones:
        model, optimizer = build(backbone, "fp32")
        model.to(args.device)
        for batch_size in args.batch_sizes:
            images = torch.randn(batch_size, 1, 28, 28, device=args.device)
            labels = torch.randint(0, 10, (batch_size,), device=args.device)
            run = step_fn(model, optimizer, "fp32", images, labels, train=True)
            run()
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            seconds[backbone, batch_size] = statistics.median(times) * TRAIN_IMAGES / batch_size

    print(f"\nestimated training epoch, seconds (x resnet18 at the same batch size), {args.device}")
    print(f"{'batch':>6} " + " ".join(f"{b:>16}" for b in args.backbones))
    for batch_size in args.batch_sizes:
        base = seconds[args.backbones[0], batch_size]
        cells = " ".join(cell(seconds[b, batch_size], base) for b in args.backbones)
        print(f"{batch_size:6d} {cells}")


if __name__ == "__main__":
    main()
