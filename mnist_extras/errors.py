"""The command line of train.py, eval.py and predict.py: the spec's spellings, resuming a run, and errors.

Two jobs, both done where a program starts and nowhere else:

- `command_line(args)` turns the spec's spellings into Hydra's before Hydra parses them:
  `task.model.backbone=resnet50` selects a config-group option (`task/model/backbone=resnet50`),
  `seed=3`, `ckpt_path=...` and `task.speed=auto` add keys that config.yaml leaves out (its
  `--cfg job` output is the spec's), and `ckpt_path=last|PATH` continues the checkpoint's run in
  its own folder with its recorded overrides. The result is a fixed point:
  `command_line(command_line(a)) == command_line(a)`, so the processes Lightning's DDP launcher
  starts by re-running the command line arrive at the same config.
- `exit_on_error` ends the program with one line, `error: ... fix: ...`, and exit code 2 when an
  exception is something the user can fix; anything else is a bug and keeps its traceback.

Every process that composes a config imports this module (sweep workers too), so it also
registers the resolvers the tracking loggers' configs use (`run_group`, `run_name`). Imports here
are light (no torch), so a typo costs half a second.
"""

import errno
import os
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

PROJECT_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PROJECT_DIR / "configs"
RUN_KEYS = ("seed", "ckpt_path", "task.speed")
# Where Hydra puts runs and sweeps by default, relative to the folder a run starts in.
RUN_ROOTS = (Path("outputs"), Path("multirun"))


class ConfigError(ValueError):
    """A value that cannot work. The message names the key, the value, what is allowed and the fix."""


def command_line(args: list[str], config_dir: Path = CONFIG_DIR, roots: tuple[Path, ...] = RUN_ROOTS) -> list[str]:
    """The spec's spellings as Hydra's, and `ckpt_path=` as a run to continue (see the module doc)."""
    args = [spell_for_hydra(arg, config_dir) for arg in args]
    if {"-m", "--multirun"} & set(args):
        return args  # a sweep resumes by being run again into its folder (the launcher's job)
    value = next((override_value(arg) for arg in args if override_key(arg) == "ckpt_path"), None)
    return args if value is None else continue_run(args, resolve_checkpoint(str(value), roots))


def spell_for_hydra(arg: str, config_dir: Path) -> str:
    """`task.model.backbone=x` -> `task/model/backbone=x` where that folder exists; `seed=3` -> `++seed=3`."""
    key, equals, value = arg.partition("=")
    name = key.lstrip("+~")
    prefix = key[: len(key) - len(name)]
    if not equals or key.startswith("-"):
        return arg
    group = config_dir / name.replace(".", "/")
    if not name.startswith("hydra") and group.is_dir():
        check_group_choice(key, value, group)
        return f"{prefix}{name.replace('.', '/')}={value}"
    if not prefix and name in RUN_KEYS:
        return f"++{name}={value}"
    return arg


def check_group_choice(key: str, value: str, group: Path) -> None:
    """A config-group option must exist: `task.model.backbone=resnet99` names the options there are.
    Hydra would stop too, but with exit code 1 and a message about its search path. Sweep
    functions, quoting and interpolation are left to Hydra."""
    if any(c in value for c in "()[]{}'\"$"):
        return
    options = sorted(p.stem for p in group.glob("*.yaml"))
    for choice in value.split(","):
        if choice.strip() not in (*options, "null"):
            raise ConfigError(f"{key}={value}: one of {', '.join(options)}; fix: {key}={options[0]}")


def override_key(arg: str) -> str | None:
    """`+task/model/backbone=resnet50` -> `task.model.backbone`; None for options such as `-m`."""
    key, equals, _ = arg.partition("=")
    return key.lstrip("+~").replace("/", ".") if equals and not key.startswith("-") else None


def override_value(arg: str) -> Any:
    """The value of one `key=value` override as Hydra reads it (quotes and escapes removed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_override(arg).value()
    except OverrideParseException as err:
        raise ConfigError(f"{arg}: {str(err).splitlines()[0]}; fix: quote the value, as key='value'") from err


def quoted(path: Path) -> str:
    """A path as a single-quoted Hydra value. Hydra unescapes a backslash only before a quote or
    at the end of the string, so only those backslashes are doubled (Windows paths stay as they are)."""
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", str(path))
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text) + "'"


def find_last_checkpoint(roots: tuple[Path, ...] = RUN_ROOTS) -> Path | None:
    """The most recently written `checkpoints/last.ckpt` of any run or sweep job under `roots`."""
    found = [path for root in roots if root.is_dir() for path in root.glob("**/checkpoints/last.ckpt")]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def resolve_checkpoint(value: str, roots: tuple[Path, ...] = RUN_ROOTS) -> Path:
    """`ckpt_path=last` or a path, as an existing checkpoint file."""
    if value == "last":
        found = find_last_checkpoint(roots)
        if found is None:
            raise ConfigError(
                f"ckpt_path=last but there is no checkpoints/last.ckpt under {' or '.join(map(str, roots))} "
                "here; fix: run from the project folder or give the file: "
                "ckpt_path=outputs/DATE/TIME/checkpoints/last.ckpt"
            )
        return found.resolve()
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path={value}: not a file; fix: give a .ckpt file written by train.py, or ckpt_path=last"
        )
    return path


def continue_run(args: list[str], checkpoint: Path) -> list[str]:
    """Make `ckpt_path=` continue the run its checkpoint came from, in that run's folder.

    That run's recorded overrides come first, so `python train.py ckpt_path=last` alone trains on
    with the same config; overrides given now (`trainer.max_epochs=20`) replace recorded ones.
    """
    given = [f"++ckpt_path={quoted(checkpoint)}" if override_key(arg) == "ckpt_path" else arg for arg in args]
    run_dir = checkpoint.parent.parent
    recorded_file = run_dir / ".hydra" / "overrides.yaml"
    if checkpoint.parent.name != "checkpoints" or not recorded_file.is_file():
        return given
    from omegaconf import OmegaConf

    # hparams_search starts a search (its file sets hydra.mode: MULTIRUN): a trial continues as a run.
    replaced = {override_key(arg) for arg in given} | {"hparams_search"}
    recorded = [arg for arg in OmegaConf.load(recorded_file) if override_key(arg) not in replaced]
    run_dir_arg = [] if "hydra.run.dir" in replaced else [f"hydra.run.dir={quoted(run_dir)}"]
    return recorded + given + run_dir_arg


def user_error(err: BaseException) -> str | None:
    """The one-line message for an exception the user can act on, or None for a bug.

    `instantiate` wraps what a constructor raises; the cause chain is searched for the first
    exception of a kind that names a fix.
    """
    while err is not None:
        if isinstance(err, ConfigError):
            return str(err)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return f"{err}; fix: free space there, or write the run elsewhere with hydra.run.dir=PATH"
        if type(err).__name__ in FIXES:
            fix = FIXES[type(err).__name__]
            return f"{err}; fix: {fix}" if fix else str(err)
        err = err.__cause__
    return None


# Exceptions that domain code raises, by class name (importing their modules would import torch),
# and the setting that fixes each; None where the message names its own fix (the files to copy where).
FIXES = {
    "MNISTUnavailable": None,
    "Diverged": "lower task.optimizer.lr (a tenth is a good first try)",
    "WeightsUnavailable": "train from scratch with task.model.backbone.pretrained=false",
    "AdapterMismatch": "set task.model.adapter.in_features to the backbone's width",
}


def exit_on_error(err: BaseException) -> None:
    """Print `error: <message>` and exit 2 if the user can fix `err`; otherwise return so the
    caller re-raises it. HYDRA_FULL_ERROR=1 keeps the traceback."""
    message = user_error(err)
    if message is not None and os.environ.get("HYDRA_FULL_ERROR") != "1":
        import logging

        # The terminal gets the line on stderr; the run's log file, once there is one, a copy.
        logfile = logging.getLogger("logfile")
        if logfile.handlers:  # configs/hydra/job_logging/run.yaml gives it the file alone
            logfile.info("error: %s", message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def interrupt_exit_code(stop: SystemExit) -> int | str | None:
    """The shell's code for a run stopped by SIGTERM (143) or Ctrl-C (130); other exits keep theirs."""
    if type(stop).__name__ == "SIGTERMException":
        return 143
    return 130 if isinstance(stop.__context__, KeyboardInterrupt) else stop.code


def run_group(output_dir: str) -> str:
    """The folder that holds a run's folder, relative to the current folder when inside it: outputs/DATE
    for a single run, the sweep folder for a sweep's job. configs/logger/{mlflow,wandb}.yaml group runs
    by it, so the jobs of a sweep, each its own train.py process, land in one experiment."""
    group = Path(output_dir).parent
    return str(group.relative_to(Path.cwd())) if group.is_relative_to(Path.cwd()) else str(group)


# Registered where every process that composes a config imports them (joblib and submitit workers too).
OmegaConf.register_new_resolver("run_group", run_group, replace=True)
OmegaConf.register_new_resolver("run_name", lambda output_dir: Path(output_dir).name, replace=True)
