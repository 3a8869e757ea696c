"""Checkpoints that survive a crash, carry their run's config and random state, and rebuild their task.

A checkpoint written by `train.py` holds, besides Lightning's state: `config` (the composed config,
resolved), `overrides` (the command-line overrides of its run) and `seed`. That is enough for
`eval.py` and `predict.py` to rebuild the model without the run folder.
"""

import errno
import os
import random
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from mnist_extras.errors import ConfigError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, fsyncs it, then renames it.

    `os.replace` within one file system is atomic, so a crash or a full disk mid-write leaves the
    previous `last.ckpt` intact instead of a truncated file where a good one was. A full disk is
    reported as such (torch buries it in a RuntimeError from its zip writer).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)  # raises: not supported
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(partial, 0o644)  # mkstemp makes files private; a checkpoint is shared like any output
            os.replace(partial, path)
        except (OSError, RuntimeError) as err:
            Path(partial).unlink(missing_ok=True)
            free = shutil.disk_usage(path.parent).free
            needed = checkpoint_bytes(checkpoint)
            if isinstance(err, OSError) and err.errno != errno.ENOSPC and free > needed:
                raise
            if not isinstance(err, OSError) and free > needed and "No space" not in str(err):
                raise
            raise OSError(
                errno.ENOSPC,
                f"no space left to write the checkpoint {path.name} in {path.parent}: it needs about "
                f"{needed / 2**20:.0f} MB and {free / 2**20:.0f} MB are free (the previous checkpoints are intact)",
            ) from err
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        if os.name != "nt":  # Windows cannot open a folder to fsync it; its renames are durable as they are
            # The rename itself lives in the folder's entry, which needs its own fsync to be durable.
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)


def checkpoint_bytes(checkpoint: Any) -> int:
    """The bytes of all tensors in a checkpoint: about the size of its file."""
    if isinstance(checkpoint, torch.Tensor):
        return checkpoint.numel() * checkpoint.element_size()
    if isinstance(checkpoint, dict):
        return sum(checkpoint_bytes(value) for value in checkpoint.values())
    if isinstance(checkpoint, list | tuple):
        return sum(checkpoint_bytes(value) for value in checkpoint)
    return 0


class SaveOnInterrupt(pl.Callback):
    """Ctrl-C or SIGTERM (what a cluster scheduler sends before it kills a job) while fitting:
    write `<dirpath>/last.ckpt` where the run stands, so `ckpt_path=last` continues it.

    Other exceptions (a nan loss, a full disk, a bug) save nothing: their weights are not worth
    resuming from, and the last good `last.ckpt` must stay. Lightning's OnExceptionCheckpoint does
    not fit: it saves on every exception, deletes its file at teardown, and its presence turns
    `fit(ckpt_path=None)` into `ckpt_path="last"`, so a new run would silently continue an old one.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException) or trainer.state.fn != "fit":
            return
        trainer.save_checkpoint(self.path)
        signal = "SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl-C"
        rank_zero_info(
            f"{signal} at epoch {trainer.current_epoch}, step {trainer.global_step}: saved {self.path}; "
            f"continue with: python train.py ckpt_path={self.path}"
        )


class RandomState(pl.Callback):
    """Puts the global random generators' state in every checkpoint and restores it on resume.

    Lightning restores weights, optimizer and loop counters but not the global random generators,
    which draw each epoch's shuffle; restoring them makes a resumed CPU run end exactly where an
    uninterrupted one does. States are stored as tensors and lists so `torch.load` can keep its
    safe `weights_only` default. Only this process's current GPU is stored, so a run can continue
    on a machine with fewer GPUs.
    """

    def state_dict(self) -> dict[str, Any]:
        name, keys, position, has_gauss, gauss = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"][0])
        name, keys, position, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        version, internal, gauss_next = state_dict["python"]
        random.setstate((version, tuple(internal), gauss_next))


def load_task(path: str | Path) -> tuple[pl.LightningModule, dict[str, Any]]:
    """The task saved in a checkpoint of `train.py`, in eval mode on the CPU, and the checkpoint."""
    checkpoint = torch.load(path, map_location="cpu")
    if "config" not in checkpoint:
        raise ConfigError(f"ckpt_path={path} holds no run config; pass a checkpoint written by train.py")
    task_cfg = OmegaConf.create(checkpoint["config"]["task"])
    if "pretrained" in task_cfg.model.backbone:
        # The weights come from the checkpoint; fetching ImageNet's first would be wasted (or fail offline).
        task_cfg.model.backbone.pretrained = False
    if "compile" in task_cfg:
        task_cfg.compile = False  # inference on a few images: compiling would cost more and need a C++ compiler
    task = instantiate(task_cfg)
    task.load_state_dict(checkpoint["state_dict"])
    return task.eval(), checkpoint
