"""Checkpoints that survive a crash and an interrupt and carry the random state for an exact resume.
Reading a checkpoint back as data is mnist_extras/loading.py's job."""

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


class AtomicCheckpoints(pl.Callback):
    """Plugs AtomicCheckpointIO into whatever strategy the trainer runs, through the strategy's
    public `checkpoint_io` setter, so that train.py does not need to know about it."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # leave a plugin the user chose
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()


class SaveOnInterrupt(pl.Callback):
    """Ctrl-C or SIGTERM (what a cluster scheduler sends before it kills a job) while fitting:
    write `<run_dir>/checkpoints/last.ckpt` where the run stands and print the command that
    continues it; while testing (training is over), say so and print the command that tests again.

    Other exceptions (a nan loss, a full disk, a bug) save nothing: their weights are not worth
    resuming from, and the last good `last.ckpt` must stay. Lightning's OnExceptionCheckpoint does
    not fit: it saves on every exception, deletes its file at teardown, and its presence turns
    `fit(ckpt_path=None)` into `ckpt_path="last"`, so a new run would silently continue an old one.
    """

    def __init__(self, run_dir: str | Path, filename: str = "last") -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "checkpoints" / f"{filename}.ckpt"

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException):
            return
        signal = "SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl-C"
        if isinstance(exception, SIGTERMException) and exception.code is None:
            # Lightning raises SystemExit() with no code, which exits 0: a scheduler or a script would
            # take the run for finished. 143 is the shell's code for a process ended by SIGTERM.
            exception.code = 128 + 15
        if trainer.state.fn == TrainerFn.FITTING:
            trainer.save_checkpoint(self.path)
            where = f"at epoch {trainer.current_epoch}, step {trainer.global_step}: saved {self.path}"
        elif self.path.is_file():
            # The test loaded the best weights: saving now would put them in last.ckpt. The last
            # checkpoint of the finished fit is kept; continuing it skips to the test.
            where = f"while testing; the run had finished training ({self.path} is its last epoch)"
        else:
            where = "after training finished; there is no last.ckpt to test again from"
            rank_zero_info(f"{signal} {where}")
            if trainer.is_global_zero:
                self.mark_interrupted(f"{signal} {where}")
            return
        line = continue_command(self.run_dir, self.path)
        rank_zero_info(f"{signal} {where}; continue with: {line}")
        if trainer.is_global_zero:
            self.mark_interrupted(f"{signal} {where}; continue with: {line}")

    def mark_interrupted(self, message: str) -> None:
        try:
            from mnist_extras.records import mark_interrupted
        except ImportError:  # records.py without the helper: run.json says what its own hooks say
            return
        mark_interrupted(self.run_dir, message)


def continue_command(run_dir: Path, checkpoint: Path) -> str:
    """`python train.py ...` that continues `checkpoint` in `run_dir`, safe to paste into a shell:
    the run's recorded overrides (each quoted for the shell), then the checkpoint and the folder
    (quoted for Hydra, then for the shell). Plain Hydra: `ckpt_path` is not in config.yaml, and
    pointing hydra.run.dir at the run makes it continue in place."""
    from mnist_extras.errors import quoted

    recorded_file = run_dir / ".hydra" / "overrides.yaml"
    recorded = OmegaConf.to_container(OmegaConf.load(recorded_file)) if recorded_file.is_file() else []
    # Replaced below; hparams_search would start a search (its file sets hydra.mode: MULTIRUN).
    dropped = ("ckpt_path", "hydra.run.dir", "hparams_search")
    kept = [arg for arg in recorded if arg.partition("=")[0].lstrip("+~") not in dropped]
    new = [f"+ckpt_path={quoted(checkpoint)}", f"hydra.run.dir={quoted(run_dir)}"]
    return " ".join(["python", "train.py", *map(shlex.quote, [*kept, *new])])


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
