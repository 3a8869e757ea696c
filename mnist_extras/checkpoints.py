"""Checkpoints that survive a crash and an interrupt and carry the random state for an exact resume."""

import errno
import os
import random
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from omegaconf import OmegaConf
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from mnist_extras.errors import quoted
from mnist_extras.records import mark_interrupted


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a temporary file beside the target, fsync it, rename it over the target: a crash or a full disk
    leaves the previous checkpoint intact. A full disk is said as such (torch hides it in a RuntimeError)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as f:  # a new file of its own: no symlink or other writer's file is followed
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(partial, 0o644)  # mkstemp makes files private; a checkpoint is shared like any output
            os.replace(partial, path)
        except BaseException as err:
            Path(partial).unlink(missing_ok=True)
            if not isinstance(err, OSError | RuntimeError):
                raise
            free, needed = shutil.disk_usage(path.parent).free / 2**20, checkpoint_bytes(checkpoint) / 2**20
            no_space = err.errno == errno.ENOSPC if isinstance(err, OSError) else "No space" in str(err)
            if free > needed and not no_space:
                raise
            message = f"it needs about {needed:.0f} MB and {free:.0f} MB are free (the previous checkpoints are intact)"
            where = f"the checkpoint {path.name} in {path.parent}"
            raise OSError(errno.ENOSPC, f"no space left to write {where}: {message}") from err
        if os.name != "nt":  # the rename lives in the folder's entry, which needs its own fsync (not on Windows)
            folder = os.open(path.parent, os.O_RDONLY)
            os.fsync(folder)
            os.close(folder)


def checkpoint_bytes(checkpoint: Any) -> int:
    """The bytes of all tensors in a checkpoint: about the size of its file."""
    if isinstance(checkpoint, torch.Tensor):
        return checkpoint.numel() * checkpoint.element_size()
    values = checkpoint.values() if isinstance(checkpoint, dict) else checkpoint
    return sum(map(checkpoint_bytes, values)) if isinstance(checkpoint, dict | list | tuple) else 0


class AtomicCheckpoints(pl.Callback):
    """Plugs AtomicCheckpointIO into whatever strategy the trainer runs (through its public setter)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # leave a plugin the user chose
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()


class SaveOnInterrupt(pl.Callback):
    """Ctrl-C or SIGTERM while fitting: save last.ckpt, print how to continue. Not OnExceptionCheckpoint: it saves
    on every exception (weights not worth resuming), and its file turns `fit(ckpt_path=None)` into "last"."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "checkpoints" / "last.ckpt"

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException):
            return
        signal = "SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl-C"
        if signal == "SIGTERM" and exception.code is None:  # Lightning's SystemExit() exits 0: "finished"
            exception.code = 128 + 15  # the shell's code for a process ended by SIGTERM
        if trainer.state.fn == TrainerFn.FITTING:
            trainer.save_checkpoint(self.path)
            message = f"{signal} at epoch {trainer.current_epoch}, step {trainer.global_step}: saved {self.path}"
        elif self.path.is_file():  # saving now would put the tested best weights in last.ckpt
            message = f"{signal} while testing; the run had finished training ({self.path} is its last epoch)"
        else:
            message = f"{signal} after training finished; there is no last.ckpt to test again from"
        if self.path.is_file():
            message += f"; continue with: {continue_command(self.run_dir, self.path)}"
        rank_zero_info(message)
        if trainer.is_global_zero:
            mark_interrupted(self.run_dir, message)


def continue_command(run_dir: Path, checkpoint: Path) -> str:
    """`python train.py ...` (quoted for the shell) with the run's overrides that continues `checkpoint` in place."""
    recorded_file = run_dir / ".hydra" / "overrides.yaml"
    recorded = OmegaConf.to_container(OmegaConf.load(recorded_file)) if recorded_file.is_file() else []
    dropped = ("ckpt_path", "hydra.run.dir", "hparams_search")  # hparams_search sets hydra.mode: MULTIRUN
    kept = [arg for arg in recorded if arg.partition("=")[0].lstrip("+~") not in dropped]
    new = [f"+ckpt_path={quoted(checkpoint)}", f"hydra.run.dir={quoted(run_dir)}"]
    return " ".join(["python", "train.py", *map(shlex.quote, [*kept, *new])])


class RandomState(pl.Callback):
    """The global random generators' state (each epoch's shuffle; Lightning does not restore it) in every checkpoint,
    as tensors and plain values (weights_only loads): a resumed CPU run ends as an uninterrupted one. One GPU's only."""

    def state_dict(self) -> dict[str, Any]:
        name, keys, *rest = np.random.get_state()
        cuda = [torch.cuda.get_rng_state()] if torch.cuda.is_available() else []
        numpy = [name, torch.from_numpy(keys.astype(np.int64)), *rest]
        return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": numpy, "python": random.getstate()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"][0])
        name, keys, *rest = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        version, internal, gauss_next = state_dict["python"]
        random.setstate((version, tuple(internal), gauss_next))  # a list in checkpoints written before
