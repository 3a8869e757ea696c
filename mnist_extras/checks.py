"""Checks that stop a config that cannot work before any run folder, data or model exists: one line
`error: <key>=<value>: <allowed>; fix: <override>`, the fix being the key's value without the user's override."""

import contextlib
import difflib
import importlib.util
import inspect
import itertools
import os
import re
import tempfile
import traceback
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from mnist_extras.errors import ConfigError, exit_on_error, override_key
from mnist_extras.loading import admitted, read_checkpoint, resolve
from mnist_extras.mnist_files import RAW_FILES
from mnist_extras.records import typed_overrides
from train import TARGETS

TRAIN_SIZE = 55_000  # data_modules.MNISTDataModule's training split
ABSENT = object()


class Settings(BaseModel):
    # What each setting allows, at the top and in the project's parts. Strict: YAML's `1` is no bool and "0.1" no
    # number. A default is the fix when the config has no value that works.
    model_config = ConfigDict(strict=True)
    seed: int = Field(0, ge=0, lt=2**32, description="a whole number in [0, 4294967295]")
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False, description="a finite number > 0")
    max_lr: float = Field(3e-3, gt=0, allow_inf_nan=False, description="a finite number > 0")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="a finite number >= 0")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="a number in [0.0, 1.0)")
    compile: bool = Field(False, description="true or false")
    pretrained: bool = Field(False, description="true or false")
    # backbones.STEMS: importing backbones would import torch
    stem: Literal["imagenet", "digits", "digits14"] = Field("imagenet", description="imagenet, digits or digits14")
    # Any width: models.SimpleModel refuses an adapter that does not fit its backbone, naming both.
    in_features: int = Field(512, gt=0, description="a whole number > 0, the backbone's width")
    out_features: int = Field(10, gt=0, description="a whole number > 0, one logit per class")
    batch_size: int = Field(64, gt=1, description="a whole number > 1 (BatchNorm needs more than one image per batch)")
    num_workers: int = Field(0, ge=0, description="a whole number >= 0")
    pin_memory: bool = Field(False, description="true or false")
    drop_last: bool = Field(True, description="true or false")
    on_device: bool | None = Field(None, description="true, false, or null (on when the run has a GPU)")
    data_dir: str = Field("./data/mnist", pattern=r"\S", description="a folder path")
    augment: bool = Field(False, description="true or false")
    elastic: float = Field(0.0, ge=0, allow_inf_nan=False, description="a number of pixels >= 0")
    decay: float = Field(0.99, gt=0, lt=1, description="a number in (0.0, 1.0), the weight the average keeps each step")


# Modules whose `_target_`s take the settings above (torch's optimizers and schedulers too).
PARTS = ("tasks.", "models.", "backbones.", "adapters.", "heads.", "loss_functions.", "data_modules.", "mnist_extras.")
# Lightning imports these loggers' classes without their packages (requirements-tracking.txt).
TRACKING = {"pytorch_lightning.loggers.MLFlowLogger": "mlflow", "pytorch_lightning.loggers.WandbLogger": "wandb"}
WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
SAFE_TRAINER = {"max_epochs": 10}  # the Trainer's default, None, is 1,000 epochs
# Each job is a train.py of its own, which Lightning runs again to start the job's other processes.
SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
OWN_PROCESS_LAUNCHERS = {"hydra_plugins.subprocess_launcher.SubprocessLauncher", SLURM}


def show(value: Any) -> str:
    """A value as an override writes it."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def refuse(key: str, value: Any, allowed: str, fix: str) -> ConfigError:
    return ConfigError(f"{key}={show(value)}: {allowed}; fix: {fix}")


def fits(kind: Any, value: Any) -> bool:
    try:
        TypeAdapter(kind).validate_python(value, strict=True)
    except ValidationError:
        return False
    return True


@dataclass
class Fixes:
    # A key's fix: its value with the user's override left out (composed only when a check fails), else a safe one.
    overrides: list[str]
    config_name: str | None = "config"

    def fix(self, key: str, works: typing.Callable[[Any], bool], fallback: Any = ABSENT) -> str:
        kept = [arg for arg in self.overrides if override_key(arg) != key]
        try:
            cfg = compose(self.config_name, kept)
            base = OmegaConf.select(cfg, key, default=ABSENT, throw_on_resolution_failure=False)
        except (HydraException, OmegaConfBaseException):  # another override needed the one left out
            base = ABSENT
        if base is not ABSENT and works(base):
            return f"{key}={show(base)}"
        if fallback is ABSENT:
            return f"leave {key} out"
        return f"{'' if base is not ABSENT else '+'}{key}={show(fallback)}"


def value_at(cfg: DictConfig, key: str, raw: Any) -> Any:
    """The resolved value, or ABSENT for `${hydra:...}`, which Hydra sets only once the job starts."""
    try:
        return OmegaConf.select(cfg, key, default=ABSENT)
    except OmegaConfBaseException as err:
        if "${hydra:" in str(raw):
            return ABSENT
        raise refuse(key, raw, f"an interpolation that resolves ({str(err).splitlines()[0]})", "give a value") from err


def target_nodes(node: Any, path: str = "") -> typing.Iterator[tuple[str, dict]]:
    """(key, node) for every node with a `_target_` in an unresolved container."""
    if isinstance(node, dict) and "_target_" in node:
        yield path, node
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from target_nodes(child, f"{path}.{key}" if path else str(key))


def check_schemas(cfg: DictConfig, fixes: Fixes) -> None:
    raw = OmegaConf.to_container(cfg, resolve=False)
    for key, node in [("", raw), *target_nodes(raw)]:
        target = str(node.get("_target_"))
        if target.startswith("torch.optim.") and OmegaConf.select(cfg, f"{key}._partial_") is not True:
            name, scheduler = f"{key}._partial_", ".lr_scheduler." in target
            passed = "optimizer to the scheduler" if scheduler else "model's parameters to the optimizer"
            allowed = f"true, since the task passes the {passed}"
            if "_partial_" not in node:
                raise ConfigError(f"{name} is not set: {allowed}; fix: +{name}=true")
            raise refuse(name, OmegaConf.select(cfg, name), allowed, f"{name}=true")
        if node is not raw and not target.startswith((*PARTS, "torch.optim.")):
            continue
        values = {}
        for field in [field for field in node if field in Settings.model_fields]:
            name = f"{key}.{field}" if key else field
            value, spec = value_at(cfg, name, node[field]), Settings.model_fields[field]
            if value is not ABSENT and not fits(Settings, {field: value}):
                works = lambda v, field=field: fits(Settings, {field: v})  # noqa: E731
                raise refuse(name, value, spec.description, fixes.fix(name, works, spec.default))
            values[field] = value
        if "batch_size" not in values:
            continue
        # No batch at all, or a last batch of one image, which BatchNorm cannot normalise.
        data = Settings.model_validate({field: value for field, value in values.items() if value is not ABSENT})
        name, size = f"{key}.batch_size", data.batch_size
        if data.drop_last and size > TRAIN_SIZE:
            fix = fixes.fix(name, lambda v: isinstance(v, int) and 1 < v <= TRAIN_SIZE, 64)
            allowed = f"at most {TRAIN_SIZE} with drop_last=true (the training split holds {TRAIN_SIZE} images, so no"
            raise refuse(name, size, f"{allowed} batch would be left)", fix)
        if not data.drop_last and TRAIN_SIZE % size == 1:
            allowed = f"a size that does not leave a last training batch of one image ({TRAIN_SIZE} % {size} = 1)"
            raise refuse(name, size, f"{allowed}, which BatchNorm cannot normalise", f"{key}.drop_last=true")


def check_targets(cfg: DictConfig) -> None:
    for key, node in target_nodes(OmegaConf.to_container(cfg, resolve=False)):
        target, where = str(node["_target_"]), f"{key}._target_"
        if not admitted(target, TARGETS):
            fix = "name a class of this project, torch.optim or pytorch_lightning, or add it to TARGETS"
            raise refuse(where, target, "not in train.py's TARGETS, the only callables Hydra lets a config name", fix)
        if target in TRACKING and importlib.util.find_spec(TRACKING[target]) is None:
            allowed = f"needs the {TRACKING[target]} package, which is not installed"
            raise refuse(where, target, allowed, "pip install -r requirements-tracking.txt")
        parts = target.split(".")
        for end in range(len(parts), 0, -1):  # the longest leading part that imports
            try:
                module = importlib.import_module(".".join(parts[:end]))
                break
            except ModuleNotFoundError as err:
                if err.name is None or not ".".join(parts[:end]).startswith(err.name):
                    raise  # a module that exists but fails to import: a bug
        else:
            raise refuse(where, target, "no module of that name can be imported", f"{where}=<module.Name>")
        missing = next((part for part in parts[end:] if not hasattr(module, part)), None)
        if missing is not None:
            close = difflib.get_close_matches(missing, [n for n in dir(module) if not n.startswith("_")], n=1)
            fix = f"{module.__name__}.{close[0]}" if close else "<an importable name>"
            raise refuse(where, target, f"{module.__name__} has no {missing}", f"{where}={fix}")


def check_trainer(cfg: DictConfig, fixes: Fixes) -> None:
    # Lightning checks ranges as train.py builds the Trainer, but not types: `max_epochs=abc` would fail an hour later.
    target = str(cfg.trainer.get("_target_"))
    parameters = inspect.signature(get_class(target).__init__).parameters
    raw = OmegaConf.to_container(cfg.trainer, resolve=False)
    for key in [key for key in raw if key != "_target_"]:
        name = f"trainer.{key}"
        value = value_at(cfg, name, raw[key])
        if value is ABSENT or isinstance(value, DictConfig):  # `${hydra:...}`, or an object such as a strategy
            continue
        if key not in parameters:
            [close] = difflib.get_close_matches(key, [p for p in parameters if p != "self"], n=1) or [None]
            hint = f" (did you mean trainer.{close}?)" if close else ""
            fix = f"{'' if close in raw else '+'}trainer.{close}={show(value)}" if close else f"~{name}"
            raise refuse(name, value, f"not an argument of {target}{hint}", fix)
        if target == "pytorch_lightning.Trainer" and key in ("accelerator", "strategy") and isinstance(value, str):
            from pytorch_lightning.accelerators import AcceleratorRegistry
            from pytorch_lightning.strategies import StrategyRegistry

            if key == "accelerator":
                names = ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]
            else:
                names = ["auto", *StrategyRegistry.available_strategies()]
            if value not in names:
                close = difflib.get_close_matches(value, names, n=1)
                shown = names if len(names) < 10 else [*(close or names[1:3]), "..."]  # strategies: 26 names
                raise refuse(name, value, f"one of {', '.join(shown)}", fixes.fix(name, names.__contains__, "auto"))
        annotation, default = parameters[key].annotation, parameters[key].default
        kinds = typing.get_args(annotation) or (annotation,)
        if not all(kind in WORDS or typing.get_origin(kind) is Literal for kind in kinds) or fits(annotation, value):
            continue  # a type with more than plain values (a callback, a logger) is Lightning's to check
        *others, last = dict.fromkeys(WORDS.get(k) or ", ".join(map(show, typing.get_args(k))) for k in kinds)
        fallback = SAFE_TRAINER.get(key, ABSENT if default in (None, inspect.Parameter.empty) else default)
        fix = fixes.fix(name, lambda v, annotation=annotation: fits(annotation, v), fallback)
        raise refuse(name, value, f"{', '.join(others)} or {last}" if others else last, fix)


def check_processes(cfg: DictConfig, launcher: str | None = None, launcher_choice: str | None = None) -> None:
    """Refuse trainers whose processes could not report back to the run, or would run the sweep again."""
    trainer = cfg.trainer
    strategy = trainer.get("strategy", "auto")
    if isinstance(strategy, DictConfig):  # a class: its name and start method
        strategy = f"{str(strategy._target_).rpartition('.')[2]}(start_method={strategy.get('start_method', 'popen')})"
    if re.search("spawn|fork|notebook", str(strategy), re.IGNORECASE):
        raise ConfigError(
            f"trainer.strategy={strategy}: spawned processes hand nothing back to the run (run.json, metrics.csv and "
            "the learning curve would stay empty); fix: trainer=ddp_cpu on CPUs, trainer=ddp on GPUs"
        )
    if launcher is None or launcher in OWN_PROCESS_LAUNCHERS:
        return
    devices = trainer.get("devices", "auto")  # one process per device
    if str(devices) in ("-1", "auto"):
        gpus = str(trainer.get("accelerator", "auto")) in ("gpu", "cuda", "auto")
        processes = max(__import__("torch").cuda.device_count(), 1) if gpus else 1
    elif isinstance(devices, ListConfig):
        processes = len(devices)
    else:  # "2" is a count, "0,1" and "0," list device indices
        indices = str(devices).split(",")
        processes = len([i for i in indices if i.strip()]) if len(indices) > 1 else int(devices)
    if processes < 2:
        return
    raise ConfigError(
        f"hydra/launcher={launcher_choice or launcher.rpartition('.')[2]} with {processes} processes per job "
        f"(trainer.devices={show(trainer.get('devices'))}): Lightning starts a job's other processes by running the "
        "command again, and this launcher's jobs are no commands of their own (they run in the sweep's process or a "
        "pool worker); fix: hydra/launcher=subprocess (each job its own train.py), or hydra/launcher=slurm"
    )


def check_writable(key: str, folder: Path, fix: str | None = None) -> None:
    # A probe file, as `os.access` says yes to root on a read-only mount; no folder is made, none removed.
    ancestor = next(path for path in (folder, *folder.parents) if path.exists())
    try:
        tempfile.TemporaryFile(dir=ancestor).close()  # unnamed where the kernel can, else removed at once
    except OSError as err:
        why = f"no file can be created in {ancestor}: {err.strerror}" if ancestor.is_dir() else f"{ancestor} is a file"
        fix = fix or f"leave {key} out, or name a folder you can write"
        raise refuse(key, folder, f"a folder this process can write ({why})", fix) from err


def check_config(cfg: DictConfig, fixes: Fixes, launcher: str | None = None, choice: str | None = None) -> None:
    """One run's config (no `hydra` node), fastest checks first; a SLURM job's GPUs and folders are elsewhere."""
    check_schemas(cfg, fixes)
    check_targets(cfg)
    if cfg.get("trainer") is not None:
        check_trainer(cfg, fixes)
        check_processes(cfg, launcher, choice)
    if launcher == SLURM:
        return
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path not in (None, "last", "best", "hpc"):  # Lightning's names; a file must be a checkpoint of train.py
        read_checkpoint(resolve(str(ckpt_path)))
    accelerator = OmegaConf.select(cfg, "trainer.accelerator")  # None too for `trainer: null`
    if accelerator in ("gpu", "cuda") and not __import__("torch").cuda.is_available():
        raise refuse(
            "trainer.accelerator", accelerator, "PyTorch sees no CUDA GPU here", "train on the CPU with trainer=cpu"
        )
    data_dir = OmegaConf.select(cfg, "data_module.data_dir")
    folder = Path(str(data_dir)).expanduser()  # relative to the CWD, as data_modules.py reads it
    if data_dir is not None and not all((folder / "MNIST" / "raw" / name).is_file() for name in RAW_FILES):
        fix = fixes.fix("data_module.data_dir", lambda other: other != data_dir, "./data/mnist")
        check_writable("data_module.data_dir", folder, fix)  # a read-only copy of the data is fine


@contextlib.contextmanager
def refusing_on_failure() -> typing.Iterator[None]:
    try:
        yield
    except Exception as err:  # not SystemExit: a check's own exit 2 passes through
        exit_on_error(err)  # a value that cannot work: its line and exit 2
        traceback.print_exception(err)
        raise SystemExit(1) from err


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """Each job's overrides, as Hydra's sweeper makes them; a range a sweeper draws from (Optuna's) is left out."""
    choices = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if not override.is_sweep_override():
            choices.append([override.input_line])
            continue
        with contextlib.suppress(HydraException):  # an interval has no list of values (nor, here, a glob)
            choices.append([f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()])
    return [list(point) for point in itertools.product(*choices)]


class ConfigCheck(Callback):
    """Runs the checks before Hydra makes a run folder or starts a sweep's first job."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if int(os.environ.get("LOCAL_RANK", "0")) > 0:
            return  # a process Lightning started for a run whose first process passed these checks
        with refusing_on_failure():
            fixes = Fixes(typed_overrides(config), config.hydra.job.config_name)
            check_config(OmegaConf.masked_copy(config, [key for key in config if key != "hydra"]), fixes)
            check_writable("hydra.run.dir", Path(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with refusing_on_failure():
            name, launcher = config.hydra.job.config_name, str(config.hydra.launcher.get("_target_"))
            for point in sweep_points(typed_overrides(config)):
                try:
                    cfg = compose(name, point)
                except (HydraException, OmegaConfBaseException) as err:  # Hydra composes a point only as it runs
                    job, message = " ".join(point), " ".join(str(err).partition("Config search path")[0].split())
                    raise ConfigError(f"the sweep's job {job}: {message}; fix: correct that override") from err
                check_config(cfg, Fixes(point, name), launcher, config.hydra.runtime.choices.get("hydra/launcher"))
            check_writable("hydra.sweep.dir", Path(config.hydra.sweep.dir))
