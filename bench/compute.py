"""Images/s per backbone for a training step and for inference, plain against each speed-up.

    python -m bench.compute                      # all backbones, batch 256
    python -m bench.compute --backbones resnet18 --batch-size 128

Variants: fp32 (plain), channels_last, bf16 autocast, bf16 autocast + channels_last, and
torch.compile of the plain model. Every variant runs the same model on the same batch,
interleaved, so machine noise hits them alike; the table gives the median of the timed rounds.
"""

import argparse
import contextlib
import statistics
import time

import torch

import backbones
from adapters import LinearAdapter
from bench.machine import describe
from heads import IdentityHead
from models import SimpleModel

BACKBONES = {"resnet18": backbones.ResNet18, "resnet34": backbones.ResNet34, "resnet50": backbones.ResNet50}
VARIANTS = ["fp32", "channels_last", "bf16", "bf16+channels_last", "compile"]


def build(backbone: str, variant: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = SimpleModel(BACKBONES[backbone](), LinearAdapter(512, 10), IdentityHead())
    if "channels_last" in variant:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if "compile" in variant:
        model = torch.compile(model)
    return model, optimizer


def step_fn(model, optimizer, variant, images, labels, train: bool):
    device = images.device.type
    autocast = torch.autocast(device, dtype=torch.bfloat16) if "bf16" in variant else contextlib.nullcontext()
    if "channels_last" in variant:
        images = images.contiguous(memory_format=torch.channels_last)

    def run():
        if train:
            model.train()
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            model.eval()
            with torch.inference_mode(), autocast:
                model(images)
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(describe())
    print(f"batch {args.batch_size}, device {args.device}, median of {args.rounds} rounds\n")
    images = torch.randn(args.batch_size, 1, 28, 28, device=args.device)
    labels = torch.randint(0, 10, (args.batch_size,), device=args.device)

    print(f"{'backbone':10} {'variant':28} {'train img/s':>12} {'x fp32':>7} {'eval img/s':>11} {'x fp32':>7}")
    for backbone in args.backbones:
        runs = {}
        for variant in args.variants:
            model, optimizer = build(backbone, variant)
            model.to(args.device)
            runs[variant] = {
                mode: step_fn(model, optimizer, variant, images, labels, train=mode == "train")
                for mode in ("train", "eval")
            }
            for run in runs[variant].values():  # warm up (and compile)
                run()
                run()
        times = {(v, m): [] for v in runs for m in ("train", "eval")}
        for _ in range(args.rounds):
            for variant, modes in runs.items():
                for mode, run in modes.items():
                    start = time.perf_counter()
                    run()
                    times[variant, mode].append(time.perf_counter() - start)
        speed = {key: args.batch_size / statistics.median(t) for key, t in times.items()}
        base = args.variants[0]
        for variant in runs:
            train, evaluate = speed[variant, "train"], speed[variant, "eval"]
            print(
                f"{backbone:10} {variant:28} {train:12.0f} {train / speed[base, 'train']:7.2f} "
                f"{evaluate:11.0f} {evaluate / speed[base, 'eval']:7.2f}"
            )


if __name__ == "__main__":
    main()
