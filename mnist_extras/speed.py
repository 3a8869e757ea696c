"""The precision and memory layout that train fastest on this machine, measured: a Lightning callback.

    python train.py callbacks=speed          # configs/callbacks/speed.yaml: the default callbacks and this one

Whether bf16 autocast or channels_last pays depends on the chip (bench/README.md has figures).
So a run measures the candidates for a few steps on its own model and batch size before
training, keeps the fastest that trains correctly, and caches the choice per machine, model and
batch size. A precision given to the trainer (anything but 32-bit) is kept: only the layout is
measured then.
"""

import copy
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import Tensor, nn

log = logging.getLogger(__name__)

PLAIN = "32-true"


@dataclass(frozen=True)
class Setting:
    precision: str = PLAIN
    channels_last: bool = False

    def __str__(self) -> str:
        return self.precision + (" + channels_last" if self.channels_last else "")


def cache_file() -> Path:
    """One JSON file per user, where caches go on Linux and macOS (`$XDG_CACHE_HOME` moves it)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mnist-hydra-lightning" / "speed.json"


class MeasuredSpeed(pl.Callback):
    """Chooses and applies a `Setting` when fit starts (before the model reaches its device), the
    same one on every rank: rank zero decides and broadcasts."""

    def __init__(self, cache: Path | None = None, steps: int = 3) -> None:
        self.cache = cache or cache_file()
        self.steps = steps

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        choice = self.choose(trainer, pl_module) if trainer.is_global_zero else None
        choice = Setting(**trainer.strategy.broadcast(choice and asdict(choice), src=0))
        if choice.channels_last:
            pl_module.model.to(memory_format=torch.channels_last)
        if choice.precision != trainer.precision:
            trainer.strategy.precision_plugin = MixedPrecision(choice.precision, trainer.strategy.root_device.type)

    def choose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Setting:
        device = trainer.strategy.root_device
        candidates = candidate_settings(trainer.precision, device)
        images, labels = first_batch(trainer)
        key = cache_key(pl_module.model, device, len(labels), trainer.precision)
        cached = read_cache(self.cache).get(key)
        if cached is not None and cached["choice"] in [asdict(c) for c in candidates]:
            log.info("speed: %s, measured on this machine %s (cached in %s; delete it to measure again)",
                     Setting(**cached["choice"]), cached["why"], self.cache)  # fmt: skip
            return Setting(**cached["choice"])
        start = time.perf_counter()
        speeds, losses = measure(pl_module, candidates, images, labels, self.steps)
        plain = Setting(trainer.precision)
        sound = [c for c in candidates if trains(losses[c], losses[plain])]
        dropped = [c for c in candidates if c not in sound]
        choice = max(sound, key=speeds.get) if sound else plain  # none learnt in 4 steps: keep the settings given
        why = (
            f"{date.today()}: {speeds[choice] / speeds[plain]:.2f}x {plain} ("
            + ", ".join(f"{c} {speeds[c]:.0f}" for c in candidates)
            + f" images/s over {self.steps} steps of {len(labels)}"
            + "".join(f"; {c} dropped, its losses {losses[c][0]:.3f} -> {losses[c][1]:.3f}" for c in dropped)
            + ")"
        )  # fmt: skip
        log.info("speed: %s, measured in %.0f s on %s", choice, time.perf_counter() - start, why)
        write_cache(self.cache, key, {"choice": asdict(choice), "why": why})
        return choice


def candidate_settings(precision: str, device: torch.device) -> list[Setting]:
    """32-bit first (the reference the others must agree with), then what this device may speed up."""
    if precision != PLAIN:
        precisions = [precision]  # given by the user: kept
    elif device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)):
        precisions = [PLAIN, "bf16-mixed"]
    else:
        precisions = [PLAIN]
    return [Setting(p, layout) for p in precisions for layout in (False, True)]


def first_batch(trainer: pl.Trainer) -> tuple[Tensor, Tensor]:
    """A real training batch, on the device and normalised as training will see it."""
    datamodule = trainer.datamodule
    batch = next(iter(datamodule.train_dataloader()))
    batch = trainer.strategy.batch_to_device(batch)
    return datamodule.on_after_batch_transfer(batch, 0)


def measure(
    task: pl.LightningModule, candidates: list[Setting], images: Tensor, labels: Tensor, steps: int
) -> tuple[dict[Setting, float], dict[Setting, tuple[float, float]]]:
    """Images/s (median step) and the losses of the first and the last of `steps + 1` steps on one
    batch, per candidate. Each starts from copies of the same weights; rounds interleave the
    candidates, so the machine's noise falls on all of them alike."""
    runs = {c: TrainingStep(task, c, images, labels) for c in candidates}
    first = {c: run() for c, run in runs.items()}  # the first call also allocates and picks kernels
    times: dict[Setting, list[float]] = {c: [] for c in candidates}
    last = {}
    for _ in range(steps):
        for c, run in runs.items():
            start = time.perf_counter()
            last[c] = run()
            times[c].append(time.perf_counter() - start)
    return {c: len(labels) / statistics.median(t) for c, t in times.items()}, {c: (first[c], last[c]) for c in runs}


class TrainingStep:
    """One optimizer step of a copy of the task's model, under one `Setting`; returns the loss."""

    def __init__(self, task: pl.LightningModule, setting: Setting, images: Tensor, labels: Tensor) -> None:
        self.model = copy.deepcopy(task.model).to(images.device).train()
        if setting.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = task.optimizer(self.model.parameters())
        self.loss_function = task.loss_function
        self.autocast = torch.autocast(images.device.type, torch.bfloat16, enabled=setting.precision == "bf16-mixed")
        self.images, self.labels = images, labels

    def __call__(self) -> float:
        with self.autocast:
            loss = self.loss_function(self.model(self.images), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())  # waits for the device, so the step is timed whole


def trains(losses: tuple[float, float], reference: tuple[float, float]) -> bool:
    """Computes what 32-bit computes and learns: its first loss, from the same weights and batch,
    within 10% (+0.05) of 32-bit's, and its last loss finite and lower. Later losses are not
    compared: a few steps on one batch amplify rounding differences even between two 32-bit
    layouts."""
    first, last = losses
    return abs(first - reference[0]) <= 0.1 * abs(reference[0]) + 0.05 and math.isfinite(last) and last < first


def cache_key(model: nn.Module, device: torch.device, batch_size: int, precision: str) -> str:
    """What the choice depends on: the chip, the threads, torch, the model, the batch size."""
    if device.type == "cuda":
        chip = torch.cuda.get_device_name(device)
    else:
        chip = f"{cpu_name()}, {torch.get_num_threads()} threads"
    size = sum(p.numel() for p in model.parameters())
    layers = hashlib.sha256(repr(model).encode()).hexdigest()[:12]  # two stems can share a parameter count
    model_name = f"{type(model).__name__} of {size} parameters, layers {layers}"
    return f"{chip} | torch {torch.__version__} | {model_name} | batch {batch_size} | {precision}"


def cpu_name() -> str:
    """The CPU's model name (also the first words of every bench/ script's machine line)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or damaged: measure again
        return {}


def write_cache(path: Path, key: str, entry: dict) -> None:
    """Adds one entry, replacing the file in one step; a cache that cannot be written is said once."""
    entries = read_cache(path) | {key: entry}
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(entries, indent=2) + "\n")
        os.replace(partial, path)
    except OSError as err:
        log.warning("speed: the choice was not cached (%s), so the next run measures again", err)
    finally:
        partial.unlink(missing_ok=True)
