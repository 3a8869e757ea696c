"""Errors a user can fix end in one line, `error: <message>; fix: <what to change>`, and exit code 2.

`user_error(err)` says whether an exception is such an error, and with which line; `ErrorLines`,
a Hydra callback (configs/hydra/callbacks/extras.yaml), prints that line when a run fails on one.
Anything else is a bug and keeps Hydra's traceback. Imports here are light (no torch): every
program and sweep worker imports this module.
"""

import errno
import inspect
import io
import logging
import os
import re
import sys
import traceback
import warnings
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A value that cannot work. The message names the key, the value, what is allowed and the fix."""


# Exceptions that the project's modules raise, by class name (importing their modules would import
# torch), and the fix for each; None where the message names its own fix.
FIXES = {
    "MNISTUnavailable": None,
    "Diverged": "lower task.optimizer.lr (a tenth is a good first try)",
    "WeightsUnavailable": "train from scratch with task.model.backbone.pretrained=false",
    "AdapterMismatch": "set task.model.adapter.in_features to the backbone's width",
    "UnknownPart": "pass a checkpoint written by train.py",
}


def user_error(err: BaseException | None) -> str | None:
    """The one-line message for an exception the user can act on, or None for a bug.

    `instantiate` wraps what a constructor raises, so the cause chain is searched for the first
    exception of a kind that names a fix.
    """
    while err is not None:
        if isinstance(err, ConfigError):
            return str(err)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return f"{err}; fix: free space there, or write the run elsewhere with hydra.run.dir=PATH"
        name = type(err).__name__
        if name in FIXES:
            return f"{err}; fix: {FIXES[name]}" if FIXES[name] else str(err)
        if name == "MisconfigurationException" and raised_by_trainer_init(err):
            return trainer_error(err)  # Lightning refusing a Trainer setting (elsewhere it can be a bug)
        err = err.__cause__
    return None


def raised_by_trainer_init(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return any(f.name == "__init__" and Path(f.filename).parts[-2:] == ("trainer", "trainer.py") for f in frames)


def trainer_error(err: BaseException) -> str:
    """Lightning's message, under the `trainer.<key>` it names when it names one."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    lightning = sys.modules.get("pytorch_lightning")  # loaded: it raised the exception
    names = inspect.signature(lightning.Trainer.__init__).parameters if lightning else {}
    key = next((word for word in re.findall(r"[a-z][a-z_]*", text) if word in names and word != "self"), None)
    if key is None:
        return f"trainer: {text}; fix: change the setting it names (python train.py --cfg job -p trainer shows them)"
    return (
        f"trainer.{key}: {text}; fix: set trainer.{key} to a value it allows "
        "(python train.py --cfg job -p trainer shows the trainer's settings)"
    )


def print_error(err: BaseException) -> str | None:
    """For a user error: `error: <message>` on stderr and in the run's log file, after the traceback
    when HYDRA_FULL_ERROR=1. Returns the message, or None for a bug (nothing printed)."""
    message = user_error(err)
    if message is None:
        return None
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        traceback.print_exception(err)
    logfile = logging.getLogger("logfile")
    if logfile.handlers:  # configs/hydra/job_logging/run.yaml gives it the run's log file alone
        logfile.info("error: %s", message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    return message


def exit_on_error(err: BaseException) -> None:
    """Print the line and exit 2 if the user can fix `err`; otherwise return, so the caller re-raises it."""
    if print_error(err) is not None:
        raise SystemExit(2)


class ErrorLines(Callback):
    """Ends a run that failed on a user error with its one line and exit code 2, and keeps library
    lines the user cannot act on off the terminal."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        quiet_libraries()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        quiet_libraries()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED:
            return
        try:
            with redirect_stderr(io.StringIO()):  # it writes "Error executing job with overrides" first
                _ = job_return.return_value
        except Exception as err:
            if config.hydra.mode == RunMode.MULTIRUN:
                # A sweep's job: the line goes with the job, and the sweeper decides what a failed job
                # means (Hydra's runs the batch's other jobs, then stops; Optuna's counts a failed trial).
                print_error(err)
                return
            exit_on_error(err)  # a bug returns here, and Hydra prints its traceback


class LightningTips(logging.Filter):
    """Drops Lightning's advertisements ("💡 Tip: ... try installing litlogger"), shown on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


LIGHTNING_TIPS = LightningTips()


def quiet_libraries() -> None:
    """Silence, where each comes from, what a user cannot act on: torch 2.14 deprecates an API that
    Lightning 2.6 calls, Lightning advertises its cloud products, and it doubts its model size
    under mixed precision (where the weights stay 32-bit, so the size it gives is right)."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Precision \S+-mixed is not supported by the model summary")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(LIGHTNING_TIPS)  # added once


def override_key(arg: str) -> str | None:
    """`+task/model/backbone=resnet50` -> `task.model.backbone`; None for options such as `-m`."""
    key, equals, _ = arg.partition("=")
    return key.lstrip("+~").replace("/", ".") if equals and not key.startswith("-") else None


def quoted(path: Path) -> str:
    """A path as a single-quoted Hydra value. Hydra unescapes a backslash only before a quote or
    at the end of the string, so only those backslashes are doubled (Windows paths stay as they are)."""
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", str(path))
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text) + "'"


def run_group(output_dir: str) -> str:
    """The folder that holds a run's folder, relative to the current folder when inside it: outputs/DATE
    for a single run, the sweep folder for a sweep's job. configs/logger/{mlflow,wandb}.yaml group runs
    by it, so the jobs of a sweep land in one experiment."""
    group = Path(output_dir).parent
    return str(group.relative_to(Path.cwd())) if group.is_relative_to(Path.cwd()) else str(group)


# Registered here because every process that composes a config imports this module (the error_lines
# callback), joblib and submitit workers too.
OmegaConf.register_new_resolver("run_group", run_group, replace=True)
OmegaConf.register_new_resolver("run_name", lambda output_dir: Path(output_dir).name, replace=True)
