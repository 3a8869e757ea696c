"""`callbacks=speed`: whether bf16 autocast or channels_last pays depends on the chip, so a run times
them on its own model and batch, keeps the fastest that trains correctly and, if its timings agree, caches
the choice per machine, model and batch size. A precision given to the trainer (not 32-bit) is kept."""

import copy
import hashlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from statistics import median

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import Tensor

log = logging.getLogger(__name__)

PLAIN = "32-true"


@dataclass(frozen=True)
class Setting:
    precision: str = PLAIN
    channels_last: bool = False

    def __str__(self) -> str:
        return self.precision + (" + channels_last" if self.channels_last else "")


class MeasuredSpeed(pl.Callback):
    """Applies a `Setting` as fit starts, before the model reaches its device; rank zero chooses for all."""

    def __init__(self, cache: Path | None = None, steps: int = 4, warmup: int = 2) -> None:
        home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        self.cache, self.steps, self.warmup = cache or home / "mnist-hydra-lightning" / "speed.json", steps, warmup

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            choice = self.choose(trainer, pl_module) if trainer.is_global_zero else None
            choice = Setting(**trainer.strategy.broadcast(choice and asdict(choice), src=0))
            if choice.channels_last:
                pl_module.model.to(memory_format=torch.channels_last)
            if choice.precision != trainer.precision:
                trainer.strategy.precision_plugin = MixedPrecision(choice.precision, trainer.strategy.root_device.type)

    def choose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Setting:
        device = trainer.strategy.root_device
        candidates, plain = candidate_settings(trainer.precision, device), Setting(trainer.precision)
        batch = trainer.strategy.batch_to_device(next(iter(trainer.datamodule.train_dataloader())))
        images, labels = trainer.datamodule.on_after_batch_transfer(batch, 0)
        key = cache_key(pl_module.model, device, len(labels), trainer.precision)
        # Under load: other work keeps over half the cores busy (the 1-minute load average less this process's
        # part, about its CPU seconds / 60); torch runs a thread per core, so steps then time the other work too.
        average = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # Windows has none: taken as quiet
        load = max(0.0, average - min(time.process_time() / 60, torch.get_num_threads()))
        cores, cached = os.cpu_count() or 1, read_cache(self.cache).get(key, {})
        stale = cached.get("load", math.inf) > cached.get("cores", 1) / 2 and load <= cores / 2  # measure again
        if "measured" in cached and cached["choice"] in map(asdict, candidates) and not stale:
            hours = (datetime.now().astimezone() - datetime.fromisoformat(cached["measured"])).total_seconds() / 3600
            log.info("speed: %s, %s, cached %.1f h ago in %s (delete it to measure again)",
                     Setting(**cached["choice"]), cached["why"], hours, self.cache)  # fmt: skip
            return Setting(**cached["choice"])
        t0 = time.perf_counter()
        times, losses = measure(pl_module, candidates, images, labels, self.steps, self.warmup)
        speeds = {c: len(labels) / median(t) for c, t in times.items()}
        sound = sorted((c for c in candidates if trains(losses[c], losses[plain])), key=speeds.get, reverse=True)
        choice = sound[0] if sound else plain  # none learnt: keep the settings given
        rates = ", ".join(f"{c} {v:.0f}" for c, v in speeds.items()) + f" images/s, {self.steps} steps of {len(labels)}"
        drops = "".join(f"; {c} dropped, losses {a:.3f} -> {b:.3f}" for c, (a, b) in losses.items() if c not in sound)
        why = f"{speeds[choice] / speeds[plain]:.2f}x {plain} ({rates}{drops}) at load {load:.1f} on {cores} cores"
        if len(sound) > 1 and (reason := noise(times, sound)):  # not cached: the next run measures again
            log.info("speed: %s (the default; not cached, timings disagree: %s); %s: %s", plain, reason, choice, why)
            return plain
        log.info("speed: %s, %s, measured in %.0f s, cached in %s", choice, why, time.perf_counter() - t0, self.cache)
        write_cache(self.cache, key, {"choice": asdict(choice), "why": why, "load": round(load, 2), "cores": cores})
        return choice


def noise(times: dict[Setting, list[float]], sound: list[Setting], limit: float = 0.15) -> str:
    """Why timings (seconds a step, by round) are not to be trusted, or "": a sound setting whose halves of the
    rounds differ by more than `limit`. Two settings that stay that steady and come out close may swap places
    from run to run; either is then as fast as the other, so that is no reason to refuse."""
    n = max(1, len(next(iter(times.values()))) // 2)
    for setting in sound:
        early, late = median(times[setting][:n]), median(times[setting][-n:])
        if max(early, late) / min(early, late) - 1 > limit:
            return f"{setting} took {early:.2f} s a step in the first half of the rounds, {late:.2f} s in the second"
    return ""


def candidate_settings(precision: str, device: torch.device) -> list[Setting]:
    """32-bit first (the reference the others must agree with), then what this device may speed up."""
    bf16 = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False))
    precisions = [PLAIN, "bf16-mixed"] if precision == PLAIN and bf16 else [precision]  # a precision given is kept
    return [Setting(p, layout) for p in precisions for layout in (False, True)]


def measure(task: pl.LightningModule, candidates: list[Setting], images: Tensor, labels: Tensor, steps=4, warmup=2):
    """Seconds of `steps` timed steps on one batch, first and last losses, each from the same weights after
    `warmup` untimed ones (the first ones allocate and pick kernels: far slower); rounds interleave them."""
    runs = {c: training_step(task, c, images, labels) for c in candidates}
    warm = [{c: run() for c, run in runs.items()} for _ in range(max(1, warmup))]
    rounds = [{c: run() for c, run in runs.items()} for _ in range(steps)]
    return {c: [r[c][1] for r in rounds] for c in runs}, {c: (warm[0][c][0], rounds[-1][c][0]) for c in runs}


def training_step(task: pl.LightningModule, setting: Setting, images: Tensor, labels: Tensor):
    """One optimizer step of a copy of the task's model under `setting`: its loss and seconds."""
    layout = torch.channels_last if setting.channels_last else torch.contiguous_format
    model = copy.deepcopy(task.model).to(images.device, memory_format=layout).train()
    optimizer = task.optimizer(model.parameters())

    def step() -> tuple[float, float]:
        start = time.perf_counter()
        with torch.autocast(images.device.type, torch.bfloat16, enabled=setting.precision == "bf16-mixed"):
            loss = task.loss_function(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach()), time.perf_counter() - start  # float() waits for the device

    return step


def trains(losses: tuple[float, float], reference: tuple[float, float]) -> bool:
    """Its first loss (same weights, same batch) within 10% (+0.05) of 32-bit's, its last finite and
    lower. Later losses are not compared: a few steps on one batch amplify rounding differences."""
    first, last = losses
    return abs(first - reference[0]) <= 0.1 * abs(reference[0]) + 0.05 and math.isfinite(last) and last < first


def cache_key(model: torch.nn.Module, device: torch.device, batch_size: int, precision: str) -> str:
    """What the choice depends on: the chip, the threads, torch, the model, the batch size."""
    chip = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{cpu_name()}, {torch.get_num_threads()} threads"
    )
    layers = hashlib.sha256(repr(model).encode()).hexdigest()[:12]  # two stems can share a parameter count
    model_name = f"{type(model).__name__} of {sum(p.numel() for p in model.parameters())} parameters, layers {layers}"
    return f"{chip} | torch {torch.__version__} | {model_name} | batch {batch_size} | {precision}"


def cpu_name() -> str:
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
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entry["measured"] = datetime.now().astimezone().isoformat(timespec="seconds")
        partial.write_text(json.dumps(read_cache(path) | {key: entry}, indent=2) + "\n")
        os.replace(partial, path)  # in one step: a concurrent run never reads half a file
    except OSError as err:
        log.warning("speed: the choice was not cached (%s), so the next run measures again", err)
    finally:
        partial.unlink(missing_ok=True)
