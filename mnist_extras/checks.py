"""Checks that stop a config that cannot work before any run folder, data or model exists.

`ConfigCheck`, a Hydra callback (configs/hydra/callbacks/extras.yaml), checks the config when a run
starts and, in a sweep, the config of every point the command line lists before the first job
starts. Hydra turns an exception raised in a callback into a warning and starts the run anyway, so
the callback ends the command itself: exit 2 and one line for a value that cannot work, exit 1 and
the traceback when the checks themselves fail (they could not vouch for the config).

1. The project's nodes against pydantic schemas chosen by `_target_`, and values that cannot work
   together (a batch size and the training split). No torch is imported, so a typo costs half a second.
2. What the libraries say: every `_target_` imports, each `trainer.*` key is an argument of the
   Trainer with a value of its type, a GPU trainer has a GPU, and the trainer's processes can report
   back to the run (no Trainer is built: train.py builds the only one).
3. The folders the run writes can be written.

Every message has one shape: `<key>=<value>: <what is allowed>; fix: <an override that works>`, the
fix being the value the key has without the user's override of it, or else a safe value.
"""

import difflib
import importlib
import inspect
import itertools
import os
import tempfile
import traceback
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal

from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mnist_extras.errors import ConfigError, exit_on_error, override_key

STEMS = ("imagenet", "digits", "digits14")  # backbones.STEMS is the source; a copy here imports no torch
TRAIN_SIZE = 55_000  # data_modules.MNISTDataModule's training split: 60,000 images less VAL_SIZE
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class Schema(BaseModel):
    # Strict: YAML's `1` is no bool and its "0.1" no number, so the class gets what the schema saw.
    # Each field's default is the safe value a fix proposes when the config has none.
    model_config = ConfigDict(strict=True, populate_by_name=True)


class Optimizer(Schema):
    is_partial: Literal[True] = Field(
        True, alias="_partial_", description="true, since the task passes the model's parameters to the optimizer"
    )
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False, description="a finite number > 0")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="a finite number >= 0")


class OneCycle(Schema):
    is_partial: Literal[True] = Field(
        True, alias="_partial_", description="true, since the task passes the optimizer to the scheduler"
    )
    max_lr: float = Field(3e-3, gt=0, allow_inf_nan=False, description="a finite number > 0")


class Loss(Schema):
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="a number in [0.0, 1.0)")


class Task(Schema):
    compile: bool = Field(False, description="true or false")


class Backbone(Schema):
    pretrained: bool = Field(False, description="true or false")
    stem: Literal[STEMS] = Field("imagenet", description=f"{', '.join(STEMS[:-1])} or {STEMS[-1]}")


class Adapter(Schema):
    # Any width: models.SimpleModel refuses an adapter that does not fit its backbone, naming both.
    in_features: int = Field(512, gt=0, description="a whole number > 0, the backbone's width")
    out_features: int = Field(10, gt=0, description="a whole number > 0, one logit per class")


class DataModule(Schema):
    batch_size: int = Field(64, gt=1, description="a whole number > 1 (BatchNorm needs more than one image per batch)")
    num_workers: int = Field(0, ge=0, description="a whole number >= 0")
    pin_memory: bool = Field(False, description="true or false")
    drop_last: bool = Field(True, description="true or false")
    on_device: bool | None = Field(None, description="true, false, or null (on when the run has a GPU)")
    data_dir: str = Field("./data/mnist", pattern=r"\S", description="a folder path")


class AugmentedDataModule(DataModule):
    augment: bool = Field(False, description="true or false")
    elastic: float = Field(0.0, ge=0, allow_inf_nan=False, description="a number of pixels >= 0")


class MovingAverage(Schema):
    decay: float = Field(0.99, gt=0, lt=1, description="a number in (0.0, 1.0), the weight the average keeps each step")


class Run(Schema):
    seed: int = Field(0, ge=0, lt=2**32, description="a whole number in [0, 4294967295]")


SCHEMAS: dict[str, type[Schema]] = {
    "torch.optim.lr_scheduler.OneCycleLR": OneCycle,
    "loss_functions.CrossEntropyLoss": Loss,
    "tasks.MNISTClassification": Task,
    "backbones.ResNet18": Backbone,
    "backbones.ResNet34": Backbone,
    "backbones.ResNet50": Backbone,
    "adapters.LinearAdapter": Adapter,
    "data_modules.MNISTDataModule": DataModule,
    "mnist_extras.augment.AugmentedMNISTDataModule": AugmentedDataModule,
    "mnist_extras.averaging.MovingAverage": MovingAverage,
}


def schema_for(target: Any) -> type[Schema] | None:
    target = str(target)
    if target.startswith("torch.optim.") and not target.startswith("torch.optim.lr_scheduler."):
        return Optimizer  # every torch optimizer takes a positive lr and, given the parameters, is partial
    return SCHEMAS.get(target)


def show(value: Any) -> str:
    """A value as it is written in an override."""
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


ABSENT = object()


class Fixes:
    """The fix for a key: the value it has when the user's override of it is left out (composed
    again, only when a check fails), if that value passes the check; else a safe value."""

    def __init__(self, overrides: list[str], config_name: str | None = "config") -> None:
        self.overrides, self.config_name = overrides, config_name

    def base(self, key: str) -> Any:
        kept = [arg for arg in self.overrides if override_key(arg) != key]
        try:
            cfg = compose(config_name=self.config_name, overrides=kept)
        except (HydraException, OmegaConfBaseException):  # another override needed the one left out
            return ABSENT
        return OmegaConf.select(cfg, key, default=ABSENT, throw_on_resolution_failure=False)

    def fix(self, key: str, works: Callable[[Any], bool], fallback: Any = ABSENT) -> str:
        base = self.base(key)
        if base is not ABSENT and works(base):
            return f"{key}={show(base)}"
        if fallback is ABSENT:
            return f"leave {key} out"
        return f"{key}={show(fallback)}" if base is not ABSENT else f"+{key}={show(fallback)}"


def refuse(key: str, value: Any, allowed: str, fix: str) -> ConfigError:
    return ConfigError(f"{key}={show(value)}: {allowed}; fix: {fix}")


def value_at(cfg: DictConfig, key: str, raw: Any) -> Any:
    """The resolved value at `key` (`raw` unresolved), or ABSENT where it names the job's Hydra
    settings (`${hydra:...}`), which Hydra sets only once the job starts, after these checks."""
    try:
        return OmegaConf.select(cfg, key, default=ABSENT)
    except OmegaConfBaseException as err:
        if "${hydra:" in str(raw):
            return ABSENT
        raise refuse(key, raw, f"an interpolation that resolves ({str(err).splitlines()[0]})", "give a value") from err


def target_nodes(node: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    """(key, node) for every node with a `_target_` in a plain, unresolved container."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for key, child in node.items():
            yield from target_nodes(child, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from target_nodes(child, f"{path}.{index}")


def passes(schema: type[Schema], field: str, value: Any) -> bool:
    try:
        schema.model_validate({field: value})
    except ValidationError:
        return False
    return True


def check_schemas(cfg: DictConfig, fixes: Fixes) -> None:
    """Raise ConfigError for the first value of a known node that has the wrong type or range."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    for key, node in [("", raw), *target_nodes(raw)]:
        schema = Run if node is raw else schema_for(node["_target_"])
        if schema is None:
            continue
        values = {}
        for field_name, spec in schema.model_fields.items():
            field = spec.alias or field_name
            name = f"{key}.{field}" if key else field
            if field == "_partial_" and field not in node:
                raise ConfigError(f"{name} is not set: {spec.description}; fix: +{name}=true")
            value = value_at(cfg, name, node[field]) if field in node else ABSENT
            if value is ABSENT:
                continue
            if not passes(schema, field, value):
                fix = fixes.fix(name, partial(passes, schema, field), spec.default)
                raise refuse(name, value, spec.description, fix)
            values[field] = value
        if issubclass(schema, DataModule):
            check_batches(key, schema.model_validate(values), fixes)


def check_batches(key: str, data: DataModule, fixes: Fixes) -> None:
    """A batch size the training split cannot serve: no batch at all, or a last batch of one image."""
    name = f"{key}.batch_size"
    if data.drop_last and data.batch_size > TRAIN_SIZE:
        fix = fixes.fix(name, lambda v: isinstance(v, int) and 1 < v <= TRAIN_SIZE, 64)
        raise refuse(
            name,
            data.batch_size,
            f"at most {TRAIN_SIZE} with drop_last=true (the training split holds {TRAIN_SIZE} images, so no batch "
            "would be left)",
            fix,
        )
    if not data.drop_last and TRAIN_SIZE % data.batch_size == 1:
        raise refuse(
            name,
            data.batch_size,
            f"a size that does not leave a last training batch of one image ({TRAIN_SIZE} % {data.batch_size} = 1), "
            "which BatchNorm cannot normalise",
            f"{key}.drop_last=true",
        )


# Loggers whose packages are in requirements-tracking.txt: Lightning imports their classes without them.
TRACKING_PACKAGES = {
    "pytorch_lightning.loggers.MLFlowLogger": "mlflow",
    "pytorch_lightning.loggers.WandbLogger": "wandb",
}


def check_targets(cfg: DictConfig) -> None:
    """Every `_target_` must name something that can be imported."""
    from importlib.util import find_spec

    for key, node in target_nodes(OmegaConf.to_container(cfg, resolve=False)):
        target = str(node["_target_"])
        package = TRACKING_PACKAGES.get(target)
        if package is not None and find_spec(package) is None:
            raise ConfigError(
                f"{key}._target_={target}: needs the {package} package, which is not installed; "
                "fix: pip install -r requirements-tracking.txt"
            )
        module, rest = importable_prefix(target)
        if module is None:
            raise ConfigError(
                f"{key}._target_={target}: no module of that name can be imported; fix: {key}._target_=<module.Name>"
            )
        missing = next((part for part in rest.split(".") if part and not hasattr(module, part)), None)
        if rest and missing is not None:
            close = difflib.get_close_matches(missing, [n for n in dir(module) if not n.startswith("_")], n=1)
            fix = f"{module.__name__}.{close[0]}" if close else "<an importable name>"
            raise ConfigError(f"{key}._target_={target}: {module.__name__} has no {missing}; fix: {key}._target_={fix}")


def importable_prefix(target: str) -> tuple[Any, str]:
    """The longest leading part of a dotted name that imports as a module, and the rest. A module
    that exists but fails to import is a bug, and its error goes on."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        try:
            return importlib.import_module(name), ".".join(parts[end:])
        except ModuleNotFoundError as err:
            if err.name is None or not name.startswith(err.name):
                raise
    return None, target


SCALARS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
# Where the Trainer's default would make things worse as a fix (max_epochs=None is 1,000 epochs).
SAFE_TRAINER = {"max_epochs": 10}


def check_trainer(cfg: DictConfig, fixes: Fixes) -> None:
    """Each `trainer.*` key must be an argument of the Trainer, with a value its annotation allows
    where that is plain (numbers, strings, true/false, a list of names). Lightning checks ranges and
    combinations itself when train.py builds the Trainer; it does not check plain types
    (`max_epochs=abc` would fail an hour later)."""
    trainer = cfg.get("trainer")
    if trainer is None:
        return
    target = str(trainer.get("_target_"))
    module, rest = importable_prefix(target)
    parameters = inspect.signature(getattr(module, rest).__init__).parameters
    raw = OmegaConf.to_container(trainer, resolve=False)
    for key in raw:
        if key == "_target_":
            continue
        name = f"trainer.{key}"
        value = value_at(cfg, name, raw[key])
        if value is ABSENT or isinstance(value, DictConfig):  # `${hydra:...}`, or an object such as a strategy
            continue
        if key not in parameters:
            close = difflib.get_close_matches(key, [p for p in parameters if p != "self"], n=1)
            if not close:
                raise refuse(name, value, f"not an argument of {target}", f"~{name}")
            fix = f"{'' if close[0] in trainer else '+'}trainer.{close[0]}={show(value)}"
            raise refuse(name, value, f"not an argument of {target} (did you mean trainer.{close[0]}?)", fix)
        names = registered_names(target, key)
        if names and isinstance(value, str) and value not in names:
            close = difflib.get_close_matches(value, names, n=1)
            shown = names if len(names) < 10 else [*(close or names[1:3]), "..."]  # strategies: 26 names
            text = f"one of {', '.join(shown)}"
            raise refuse(name, value, text, fixes.fix(name, names.__contains__, "auto"))
        kinds = typing.get_args(parameters[key].annotation) or (parameters[key].annotation,)
        allowed = plain_kinds(kinds)
        if allowed is None or has_type(value, kinds):
            continue
        default = parameters[key].default
        fallback = SAFE_TRAINER.get(key, ABSENT if default in (None, inspect.Parameter.empty) else default)
        fix = fixes.fix(name, partial(has_type, kinds=kinds), fallback)
        text = allowed[0] if len(allowed) == 1 else f"{', '.join(allowed[:-1])} or {allowed[-1]}"
        raise refuse(name, value, text, fix)


def registered_names(target: str, key: str) -> list[str]:
    """The names Lightning's Trainer takes for an accelerator or a strategy given as a string."""
    if target != "pytorch_lightning.Trainer" or key not in ("accelerator", "strategy"):
        return []
    if key == "accelerator":
        from pytorch_lightning.accelerators import AcceleratorRegistry

        return ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]
    from pytorch_lightning.strategies import StrategyRegistry

    return ["auto", *StrategyRegistry.available_strategies()]


def plain_kinds(kinds: tuple) -> list[str] | None:
    """The allowed values of an annotation as words, or None if it allows more than plain values."""
    allowed: list[str] = []
    for kind in kinds:
        if typing.get_origin(kind) is Literal:
            allowed += [show(v) for v in typing.get_args(kind)]
        elif kind in SCALARS:
            allowed.append(SCALARS[kind])
        else:
            return None
    return list(dict.fromkeys(allowed))


def has_type(value: Any, kinds: tuple) -> bool:
    for kind in kinds:
        if typing.get_origin(kind) is Literal and value in typing.get_args(kind) and not isinstance(value, bool):
            return True
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if kind in (bool, str, type(None)) and isinstance(value, kind):
            return True
    return False


def strategy_name(trainer: DictConfig) -> str:
    """`ddp_spawn` for a strategy given by name; the class and start method for one given as a node."""
    strategy = trainer.get("strategy", "auto")
    if isinstance(strategy, DictConfig):
        name = str(strategy.get("_target_")).rpartition(".")[2]
        return f"{name}(start_method={strategy.get('start_method', 'popen')})"
    return str(strategy)


def local_processes(trainer: DictConfig) -> int:
    """How many processes the trainer runs on this machine: one per device it uses."""
    devices = trainer.get("devices", "auto")
    if isinstance(devices, str) and "," in devices:  # "0," and "0,1" are lists of device indices, "2" a count
        return len([part for part in devices.strip("[]").split(",") if part.strip()])
    if not isinstance(devices, int | str):
        return len(devices)
    if devices in (-1, "-1", "auto"):
        if str(trainer.get("accelerator", "auto")) not in ("gpu", "cuda", "auto"):
            return 1
        import torch

        return max(torch.cuda.device_count(), 1)
    return int(devices)


# Launchers whose jobs each run as their own train.py (by a launcher process, or by SLURM): there
# Lightning can start a job's other ranks by running its command line again.
OWN_PROCESS_LAUNCHERS = {
    "hydra_plugins.subprocess_launcher.SubprocessLauncher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
}
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def check_processes(cfg: DictConfig, launcher: str | None = None, launcher_choice: str | None = None) -> None:
    """Refuse trainers whose processes could not report back to the run, or would re-run a sweep."""
    trainer = cfg.get("trainer")
    if trainer is None:
        return
    strategy = strategy_name(trainer)
    if any(word in strategy.lower() for word in ("spawn", "fork", "notebook")):
        raise ConfigError(
            f"trainer.strategy={strategy}: spawned processes hand nothing back to the run "
            "(run.json, metrics.csv and the learning curve would stay empty); fix: trainer=ddp_cpu on CPUs, "
            "trainer=ddp on GPUs"
        )
    if launcher is None or launcher in OWN_PROCESS_LAUNCHERS:
        return
    processes = local_processes(trainer)
    if processes > 1:
        name = launcher_choice or launcher.rpartition(".")[2]
        raise ConfigError(
            f"hydra/launcher={name} with {processes} processes per job "
            f"(trainer.devices={show(trainer.get('devices'))}): "
            "Lightning starts a job's other processes by running the command again, and this launcher's jobs are no "
            "commands of their own (they run in the sweep's process or a pool worker); fix: hydra/launcher=subprocess "
            "(each job its own train.py), or hydra/launcher=slurm"
        )


def check_gpu(cfg: DictConfig) -> None:
    accelerator = cfg.get("trainer", {}).get("accelerator")
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={accelerator}: PyTorch sees no CUDA GPU here; "
                "fix: train on the CPU with trainer=cpu"
            )


def check_writable(key: str, folder: Path, fix: str) -> None:
    """The run makes `folder` when it starts: its nearest existing ancestor must be a folder in which
    this process can create a file (`os.access` says yes to root on a read-only mount). The probe
    is a uniquely named file, and only that file is removed: no folder is made, none deleted."""
    ancestor = next(path for path in (folder, *folder.parents) if path.exists())
    if not ancestor.is_dir():
        raise ConfigError(f"{key}={folder}: a folder this process can write ({ancestor} is a file); fix: {fix}")
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=ancestor)
    except OSError as err:
        raise ConfigError(
            f"{key}={folder}: a folder this process can write (no file can be created in {ancestor}: "
            f"{err.strerror}); fix: {fix}"
        ) from err
    os.close(handle)
    os.unlink(probe)


def check_data_dir(cfg: DictConfig, fixes: Fixes) -> None:
    data_dir = cfg.get("data_module", {}).get("data_dir")
    if data_dir is None:
        return
    folder = Path(str(data_dir)).expanduser()  # relative to the folder the command runs in, as data_modules.py reads it
    if all((folder / "MNIST" / "raw" / name).is_file() for name in MNIST_FILES):
        return  # a read-only copy of the data is fine: nothing will be written
    fix = fixes.fix("data_module.data_dir", lambda other: other != data_dir, "./data/mnist")
    check_writable("data_module.data_dir", folder, fix)


def check_config(
    cfg: DictConfig, fixes: Fixes, launcher: str | None = None, launcher_choice: str | None = None
) -> None:
    """Everything about one run's config (the `hydra` node left out), fastest checks first. A SLURM
    sweep's jobs run on other machines, with GPUs and folders the submitting host may lack: those
    are not checked here."""
    check_schemas(cfg, fixes)
    check_targets(cfg)
    check_trainer(cfg, fixes)
    check_processes(cfg, launcher, launcher_choice)
    if launcher != SLURM_LAUNCHER:
        check_gpu(cfg)
        check_data_dir(cfg, fixes)


@contextmanager
def refusing_on_failure() -> Iterator[None]:
    """A check that fails stops the command: Hydra would warn and go on. A value that cannot work
    gets its line and exit 2 (after the traceback with HYDRA_FULL_ERROR=1); a check that breaks
    prints its traceback and exits 1."""
    try:
        yield
    except SystemExit:
        raise
    except Exception as err:
        exit_on_error(err)
        traceback.print_exception(err)
        raise SystemExit(1) from err


def task_overrides(config: DictConfig) -> list[str]:
    # Unresolved: an override may hold `${...}` that only a running job can resolve.
    return [str(arg) for arg in OmegaConf.to_container(config.hydra.overrides.task, resolve=False)]


class ConfigCheck(Callback):
    """Runs the checks before Hydra makes a run folder (a single run) or starts a sweep's first job."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if int(os.environ.get("LOCAL_RANK", "0")) > 0:
            return  # a process Lightning started for a run whose first process passed these checks
        with refusing_on_failure():
            overrides = task_overrides(config)
            fixes = Fixes(overrides, config.hydra.job.config_name)
            check_config(without_hydra(config), fixes)
            fix = "leave hydra.run.dir out, or name a folder you can write"
            check_writable("hydra.run.dir", Path(config.hydra.run.dir), fix)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with refusing_on_failure():
            launcher = str(config.hydra.launcher.get("_target_"))
            choice = config.hydra.runtime.choices.get("hydra/launcher")
            seen = set()
            for point in sweep_points(task_overrides(config)):
                cfg = compose_point(config.hydra.job.config_name, point)
                text = OmegaConf.to_yaml(cfg)
                if text not in seen:
                    seen.add(text)
                    check_config(cfg, Fixes(point, config.hydra.job.config_name), launcher, choice)
            fix = "leave hydra.sweep.dir out, or name a folder you can write"
            check_writable("hydra.sweep.dir", Path(config.hydra.sweep.dir), fix)


def without_hydra(config: DictConfig) -> DictConfig:
    return OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """The overrides of each job the command line lists (the product of its sweeps, as Hydra's
    sweeper makes them). A sweep that a sweeper draws from (Optuna's `interval(...)`) has no list of
    values: the points are checked with the rest of the command line."""
    choices = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if not override.is_sweep_override():
            choices.append([override.input_line])
            continue
        key = override.get_key_element()
        try:
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        except HydraException:  # an interval has no list of values (nor, here, a glob)
            continue
    return [list(point) for point in itertools.product(*choices)]


def compose_point(config_name: str | None, overrides: list[str]) -> DictConfig:
    try:
        return compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:  # Hydra composes a sweep's points only as they run
        message = " ".join(str(err).partition("Config search path")[0].split())  # the search path is no news
        raise ConfigError(f"the sweep's job {' '.join(overrides)}: {message}; fix: correct that override") from err
