"""Checks that stop a config that cannot work before any run folder, data or model exists.

`ConfigCheck`, a Hydra callback (configs/config.yaml), runs them when a run starts and, in a sweep,
for every point the command line lists before the first job starts. Two steps:

1. The project's own nodes are checked against typed schemas (below), chosen by their `_target_`,
   with each field's range beside it. No torch is imported, so a typo costs half a second.
2. Then what only the libraries can say: every `_target_` is imported, and the trainer is built
   (Lightning checks its own arguments); a strategy whose processes could not report back to the
   run is refused, and the data and run folders are written to for real.

Every message has one shape: `<key>=<value>: <what is allowed>; fix: <an override that works>`.
"""

import difflib
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mnist_extras.errors import ConfigError, exit_on_error
from shapes import CLASSES, FEATURES, STEMS


def ranged(default: Any, allowed: str, ok: Callable[[Any], bool] = lambda v: True) -> Any:
    return field(default=default, metadata={"allowed": allowed, "ok": ok})


def finite(v: float) -> bool:
    return math.isfinite(v)


@dataclass
class OptimizerSchema:
    lr: float = ranged(5e-5, "a finite number > 0", lambda v: finite(v) and v > 0)
    weight_decay: float = ranged(0.2, "a finite number >= 0", lambda v: finite(v) and v >= 0)


@dataclass
class OneCycleSchema:
    max_lr: float = ranged(3e-3, "a finite number > 0", lambda v: finite(v) and v > 0)


@dataclass
class LossSchema:
    label_smoothing: float = ranged(0.1, "a number in [0.0, 1.0)", lambda v: 0 <= v < 1)


@dataclass
class TaskSchema:
    compile: bool = ranged(False, "true or false")
    speed: str | None = ranged(
        "auto", "auto, or null for the trainer's settings as given", lambda v: v in {None, "auto"}
    )


@dataclass
class BackboneSchema:
    pretrained: bool = ranged(False, "true or false")
    stem: str = ranged("imagenet", f"{', '.join(STEMS[:-1])} or {STEMS[-1]}", lambda v: v in STEMS)


@dataclass
class AdapterSchema:
    in_features: int = ranged(FEATURES, f"{FEATURES}, the width every backbone gives", lambda v: v == FEATURES)
    out_features: int = ranged(CLASSES, f"{CLASSES}, one logit per digit", lambda v: v == CLASSES)


@dataclass
class DataModuleSchema:
    batch_size: int = ranged(64, "a whole number >= 1", lambda v: v >= 1)
    num_workers: int = ranged(0, "a whole number >= 0", lambda v: finite(v) and v >= 0)
    pin_memory: bool = ranged(False, "true or false")
    drop_last: bool = ranged(True, "true or false")
    augment: bool = ranged(False, "true or false")
    elastic: float = ranged(0.0, "a number of pixels >= 0 (used with augment=true)", lambda v: finite(v) and v >= 0)
    on_device: bool | None = ranged(None, "true, false, or null (on when the run has a GPU)")
    data_dir: str = ranged("./data/mnist", "a folder path", lambda v: bool(v.strip()))


@dataclass
class MovingAverageSchema:
    decay: float = ranged(0.99, "a number in (0.0, 1.0), the weight the average keeps each step", lambda v: 0 < v < 1)


@dataclass
class RunSchema:
    seed: int | None = ranged(42, "a whole number in [0, 4294967295], or null", lambda v: v is None or 0 <= v < 2**32)


SCHEMAS = {
    "torch.optim.Adam": OptimizerSchema,
    "torch.optim.AdamW": OptimizerSchema,
    "torch.optim.lr_scheduler.OneCycleLR": OneCycleSchema,
    "loss_functions.CrossEntropyLoss": LossSchema,
    "tasks.MNISTClassification": TaskSchema,
    "backbones.ResNet18": BackboneSchema,
    "backbones.ResNet34": BackboneSchema,
    "backbones.ResNet50": BackboneSchema,
    "adapters.LinearAdapter": AdapterSchema,
    "data_modules.MNISTDataModule": DataModuleSchema,
    "checkpoints.MovingAverage": MovingAverageSchema,
}


def show(value: Any) -> str:
    """A value as it is written in an override."""
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def check_schemas(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value of a known node that has the wrong type or range."""
    check_node("", cfg, RunSchema)
    for key, node in target_nodes(cfg):
        schema = SCHEMAS.get(node.get("_target_"))
        if schema is not None:
            check_node(key, node, schema)
    optimizer = cfg.get("task", {}).get("optimizer")
    if optimizer is not None and optimizer.get("_partial_") is not True:
        raise ConfigError(
            f"task.optimizer._partial_={show(optimizer.get('_partial_'))}: true, since the task passes the "
            "model's parameters to the optimizer; fix: task.optimizer._partial_=true"
        )


def target_nodes(node: DictConfig, path: str = "") -> list[tuple[str, DictConfig]]:
    found = [(path, node)] if "_target_" in node else []
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            found += target_nodes(child, f"{path}.{key}" if path else str(key))
    return found


def check_node(key: str, node: DictConfig, schema: type) -> None:
    for spec in fields(schema):
        if spec.name not in node:
            continue
        name = f"{key}.{spec.name}" if key else spec.name
        fix = f"{name}={show(spec.default)}"
        try:
            value = node[spec.name]
        except OmegaConfBaseException as err:  # an interpolation that does not resolve
            raise ConfigError(f"{name}: cannot be resolved ({str(err).splitlines()[0]}); fix: {fix}") from err
        try:
            typed = OmegaConf.merge(OmegaConf.structured(schema), {spec.name: value})[spec.name]
        except OmegaConfBaseException as err:
            raise ConfigError(f"{name}={show(value)}: {spec.metadata['allowed']}; fix: {fix}") from err
        if not spec.metadata["ok"](typed):
            raise ConfigError(f"{name}={show(value)}: {spec.metadata['allowed']}; fix: {fix}")


# Loggers whose packages are in requirements-tracking.txt: Lightning imports their classes without them.
TRACKING_PACKAGES = {
    "pytorch_lightning.loggers.MLFlowLogger": "mlflow",
    "pytorch_lightning.loggers.WandbLogger": "wandb",
}


def check_targets(cfg: DictConfig) -> None:
    """Every `_target_` must name something that can be imported."""
    from importlib.util import find_spec

    for key, node in target_nodes(cfg):
        target = str(node.get("_target_"))
        package = TRACKING_PACKAGES.get(target)
        if package is not None and find_spec(package) is None:
            raise ConfigError(
                f"{key}._target_={target}: needs the {package} package, which is not installed; "
                "fix: pip install -r requirements-tracking.txt"
            )
        module, name = importable_prefix(target)
        if module is None:
            raise ConfigError(
                f"{key}._target_={target}: no module of that name can be imported; fix: {key}._target_=<module.Name>"
            )
        missing = next((part for part in name.split(".") if part and not hasattr(module, part)), None)
        if name and missing is not None:
            close = difflib.get_close_matches(missing, [n for n in dir(module) if not n.startswith("_")], n=1)
            fix = f"{module.__name__}.{close[0]}" if close else "<an importable name>"
            raise ConfigError(f"{key}._target_={target}: {module.__name__} has no {missing}; fix: {key}._target_={fix}")


def importable_prefix(target: str) -> tuple[Any, str]:
    """The longest leading part of a dotted name that imports as a module, and the rest."""
    import importlib

    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        try:
            return importlib.import_module(".".join(parts[:end])), ".".join(parts[end:])
        except ImportError:
            continue
    return None, target


def check_trainer_arguments(trainer: DictConfig) -> None:
    """Each `trainer.*` key must be an argument of the Trainer, with a value its type annotation allows.
    Lightning checks ranges and combinations itself when the trainer is built; it does not check
    plain types (`max_epochs=abc` would fail an hour later)."""
    import inspect
    import typing

    from hydra.utils import get_object

    target = get_object(trainer._target_)
    parameters = inspect.signature(target.__init__).parameters
    for key, value in OmegaConf.to_container(trainer, resolve=True).items():
        if key == "_target_":
            continue
        name = f"trainer.{key}"
        if key not in parameters:
            close = difflib.get_close_matches(key, list(parameters), n=1)
            fix = f"trainer.{close[0]}={show(value)}" if close else f"~trainer.{key}"
            raise ConfigError(f"{name}={show(value)}: not an argument of {trainer._target_}; fix: {fix}")
        kinds = typing.get_args(parameters[key].annotation) or (parameters[key].annotation,)
        allowed = []
        for kind in kinds:
            if typing.get_origin(kind) is typing.Literal:
                allowed += [show(v) for v in typing.get_args(kind)]
            elif kind in SCALARS:
                allowed.append(SCALARS[kind])
            else:
                return_early = True
                break
        else:
            return_early = False
        if return_early or fits(value, kinds):
            continue
        default = parameters[key].default
        fix = f"{name}={show(default)}" if default is not inspect.Parameter.empty else f"~{name}"
        allowed = list(dict.fromkeys(allowed))
        text = allowed[0] if len(allowed) == 1 else f"{', '.join(allowed[:-1])} or {allowed[-1]}"
        raise ConfigError(f"{name}={show(value)}: {text}; fix: {fix}")


SCALARS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def fits(value: Any, kinds: tuple) -> bool:
    import typing

    for kind in kinds:
        if typing.get_origin(kind) is typing.Literal and value in typing.get_args(kind) and not isinstance(value, bool):
            return True
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if kind in (bool, str, type(None)) and isinstance(value, kind):
            return True
    return False


def checkable(trainer: DictConfig) -> DictConfig:
    """The trainer node less the keys that name the run's folder (`${hydra:runtime.output_dir}`, a
    profiler's `dirpath`): Hydra knows that folder only once the run starts, after these checks."""
    raw = OmegaConf.to_container(trainer, resolve=False)
    return OmegaConf.create({key: value for key, value in raw.items() if "${hydra:" not in str(value)})


def build_trainer(cfg: DictConfig) -> Any:
    """The configured Trainer, built only to let Lightning check its arguments."""
    import logging

    from hydra.utils import instantiate

    if cfg.trainer.get("accelerator") in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={cfg.trainer.accelerator}: PyTorch sees no CUDA GPU here; "
                "fix: train on the CPU with trainer=cpu"
            )
    trainer = checkable(cfg.trainer)
    check_trainer_arguments(trainer)
    quiet = logging.getLogger("pytorch_lightning")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # "GPU available: ..." belongs to the real trainer
    try:
        return instantiate(trainer, logger=False, enable_checkpointing=False, callbacks=[])
    except Exception as err:
        cause = err.__cause__ or err
        raise ConfigError(
            f"trainer: {str(cause).strip().splitlines()[0]}; fix: change the trainer setting it names "
            "(python train.py --cfg job --package trainer shows them)"
        ) from err
    finally:
        quiet.setLevel(level)


def check_processes(trainer: Any, strategy: Any, launcher: str | None = None) -> None:
    """Refuse strategies whose processes could not write this run's records."""
    from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher

    started_by = trainer.strategy.launcher
    if isinstance(started_by, _MultiProcessingLauncher):
        raise ConfigError(
            f"trainer.strategy={strategy}: spawned processes hand nothing back to the run "
            "(run.json, metrics.csv and the learning curve would stay empty); fix: trainer=ddp_cpu on CPUs, "
            "trainer=ddp on GPUs"
        )
    reruns_command = isinstance(started_by, _SubprocessScriptLauncher) and not (
        trainer.strategy.cluster_environment.creates_processes_externally
    )
    if reruns_command and launcher and ("joblib" in launcher or "LocalLauncher" in launcher):
        raise ConfigError(
            f"hydra.launcher={launcher.rpartition('.')[2]} with {trainer.world_size} processes per job: Lightning "
            "starts a job's other processes by re-running its command, which in a pool worker is not train.py; "
            "fix: leave hydra/launcher at its default (each job its own train.py), or hydra/launcher=slurm"
        )


def check_writable(key: str, folder: Path, fix: str) -> None:
    """Create `folder` and write a file in it for real (`os.access` says yes to root on a read-only
    mount), then remove what the probe made: the run makes its folders when it starts."""
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{key}={folder}: a folder this process can write ({err.strerror}); fix: {fix}") from err
    finally:
        if missing:
            shutil.rmtree(missing[-1], ignore_errors=True)  # the topmost folder the probe made


def check_data_dir(cfg: DictConfig) -> None:
    from mnist_extras.mnist_files import RAW_FILES, data_dir_path

    data_dir = cfg.get("data_module", {}).get("data_dir")
    if data_dir is None:
        return
    raw = data_dir_path(data_dir) / "MNIST" / "raw"
    if all((raw / name).is_file() for name in RAW_FILES):
        return  # a read-only copy of the data is fine: nothing will be written
    check_writable("data_module.data_dir", data_dir_path(data_dir), "data_module.data_dir=./data/mnist")


def check_run(cfg: DictConfig, launcher: str | None = None) -> None:
    """Everything about one run's config, fastest checks first. A SLURM sweep's jobs run on other
    machines (with GPUs the submitting host may lack): their trainer and data are checked there."""
    check_schemas(cfg)
    check_targets(cfg)
    if launcher and "SlurmLauncher" in launcher:
        check_trainer_arguments(checkable(cfg.trainer))
        return
    check_processes(build_trainer(cfg), cfg.trainer.get("strategy"), launcher)
    check_data_dir(cfg)


class ConfigCheck(Callback):
    """Runs the checks before Hydra makes a run folder (a single run) or starts a sweep's first job."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if int(os.environ.get("LOCAL_RANK", "0")) > 0:
            return  # a process Lightning started for a run whose first process passed these checks
        try:
            check_run(without_hydra(config))
            check_writable("hydra.run.dir", Path(config.hydra.run.dir), "hydra.run.dir=PATH (a writable folder)")
        except ConfigError as err:
            exit_on_error(err)
            raise

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            launcher = config.hydra.launcher.get("_target_")
            seen = set()
            for point in sweep_points(config):
                cfg = compose_point(config, point)
                key = OmegaConf.to_yaml(cfg)
                if key not in seen:
                    seen.add(key)
                    check_run(cfg, launcher)
            check_writable("hydra.sweep.dir", Path(config.hydra.sweep.dir), "hydra.sweep.dir=PATH (a writable folder)")
        except ConfigError as err:
            exit_on_error(err)
            raise


def without_hydra(config: DictConfig) -> DictConfig:
    cfg = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
    return cfg


def sweep_points(config: DictConfig) -> list[list[str]]:
    """The overrides of each job a sweep's command line lists. For a sweeper that draws its own
    points (Optuna), only what the command line fixes; each drawn trial is checked as it runs."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    if "BasicSweeper" not in str(config.hydra.sweeper.get("_target_")):
        return [[o.input_line for o in parsed if not o.is_sweep_override()]]
    return [point for batch in BasicSweeper.split_arguments(parsed, None) for point in batch]


def compose_point(config: DictConfig, overrides: list[str]) -> DictConfig:
    from hydra import compose

    try:
        return compose(config_name=config.hydra.job.config_name, overrides=overrides)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{' '.join(overrides)}: {str(err).splitlines()[0]}; fix: correct that override") from err
