"""Errors a user can fix end in one line, `error: <message>; fix: <what to change>`, and exit code 2; anything
else is a bug and keeps its traceback. No torch here: every program and sweep worker imports this module."""

import contextlib
import errno
import inspect
import io
import logging
import os
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A value that cannot work; the message names the key, the value, what is allowed and the fix."""


# The project's exceptions by class name (importing them would import torch); None: the message names its fix.
FIXES = {
    "MNISTUnavailable": None,
    "Diverged": "lower task.optimizer.lr (a tenth is a good first try)",
    "WeightsUnavailable": "train from scratch with task.model.backbone.pretrained=false",
    # models.py's message ends with the backbone's width.
    "AdapterMismatch": lambda message: f"task.model.adapter.in_features={message.rpartition(' gives ')[2]}",
    "UnknownPart": "pass a checkpoint written by train.py",
}


def user_error(err: BaseException | None) -> str | None:
    """The line for an exception the user can act on (anywhere in the chain `instantiate` makes); None for a bug."""
    while err is not None:
        name = type(err).__name__
        if isinstance(err, ConfigError):
            return str(err)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return f"{err}; fix: free space there, or write the run elsewhere with hydra.run.dir=PATH"
        if name in FIXES:
            fix = FIXES[name](str(err)) if callable(FIXES[name]) else FIXES[name]
            return f"{err}; fix: {fix}" if fix else str(err)
        frames = [(f.name, *Path(f.filename).parts[-2:]) for f in traceback.extract_tb(err.__traceback__)]
        if name == "MisconfigurationException" and ("__init__", "trainer", "trainer.py") in frames:  # Trainer(...)
            text = (str(err).strip() or name).splitlines()[0]
            names = inspect.signature(sys.modules["pytorch_lightning"].Trainer.__init__).parameters
            key = next((f"trainer.{w}" for w in re.findall(r"[a-z][a-z_]*", text) if w in names and w != "self"), "")
            fix = f"set {key} to a value it allows" if key else "change the setting it names"
            return f"{key or 'trainer'}: {text}; fix: {fix} (python train.py --cfg job -p trainer shows them)"
        err = err.__cause__
    return None


def exit_on_error(err: BaseException, stop: bool = True) -> None:
    """For a user error, `error: <message>` on stderr and in the run's log, then exit 2 if `stop`; a bug returns."""
    if (message := user_error(err)) is None:
        return
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        traceback.print_exception(err)
    if (logfile := logging.getLogger("logfile")).handlers:  # the run's log alone (configs/hydra/job_logging)
        logfile.info("error: %s", message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    if stop:
        raise SystemExit(2)


def failure(job_return: JobReturn) -> BaseException | None:
    """A failed job's exception: Hydra's public getter raises it (and prints the job's overrides)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            job_return.return_value  # noqa: B018
    except BaseException as err:  # noqa: BLE001 - whatever the job raised is what it failed with
        return err
    return None


class ErrorLines(Callback):
    """Ends a run that failed on a user error with its line and exit 2; keeps library noise off the terminal."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        quiet_libraries()

    on_multirun_start = on_run_start
    on_job_start = on_run_start  # also in the job's own process: joblib's and submitit's workers

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        # In a sweep the sweeper decides what a failed job means; a bug returns here, and Hydra prints its traceback.
        if job_return.status == JobStatus.FAILED and (err := failure(job_return)) is not None:
            exit_on_error(err, stop=config.hydra.mode != RunMode.MULTIRUN)


def quiet_lightning(record: logging.LogRecord) -> bool:
    noise = ("💡 Tip:", "Trainer already configured with model summary", "Loading `train_dataloader` to estimate")
    return not str(record.msg).startswith(noise)


def quiet_libraries() -> None:
    # torch deprecates an API Lightning calls; Lightning advertises its cloud, repeats that a model summary is set,
    # says how it counts a schedule's steps, and doubts its size under mixed precision (where the weights stay
    # 32-bit, so the size is right).
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Precision \S+-mixed is not supported by the model summary")
    # metrics.csv sits in the run folder beside .hydra/: a fresh run there is meant to start its file afresh.
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(quiet_lightning)  # added once


def override_key(arg: str) -> str | None:
    """`+task/model/backbone=resnet50` -> `task.model.backbone`; None for options such as `-m`."""
    key, equals, _ = arg.partition("=")
    return key.lstrip("+~").replace("/", ".") if equals and not key.startswith("-") else None


def quoted(path: Path) -> str:
    # Single-quoted for Hydra, which unescapes a backslash only before a quote or at the end.
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", str(path))
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text) + "'"


# configs/logger/{mlflow,wandb}.yaml group a sweep's jobs by their folder's parent (relative inside the CWD) and
# name them by their folder. Registered here: every process that composes a config imports this module.
def run_group(output_dir: str) -> str:
    group = Path(output_dir).parent
    return str(group.relative_to(Path.cwd()) if group.is_relative_to(Path.cwd()) else group)


OmegaConf.register_resolver("run_group", run_group, replace=True)
OmegaConf.register_resolver("run_name", lambda output_dir: Path(output_dir).name, replace=True)
