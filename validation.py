"""Checks on the composed config that run before anything heavy is imported or built.

`validate` reads the config and the file system only: it imports neither torch nor Lightning and
opens no data, so a typo costs half a second instead of a crashed run. Every message has one shape:
`<key>=<value>: <what is allowed>; fix: <an override that works>`.
"""

import ast
import difflib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A value that cannot work. The message names the key, the value, what is allowed and the fix."""


def config_error_in(err: BaseException | None) -> ConfigError | None:
    """The ConfigError behind `err`, which `instantiate` wraps in an InstantiationException."""
    while err is not None and not isinstance(err, ConfigError):
        err = err.__cause__
    return err


def exit_on_config_error(err: BaseException) -> None:
    """End the program with `error: <message>` and exit code 2, as argparse does, if `err` is (or
    wraps) a ConfigError; otherwise return so the caller re-raises. HYDRA_FULL_ERROR=1 keeps the
    traceback."""
    cause = config_error_in(err)
    if cause is not None and os.environ.get("HYDRA_FULL_ERROR") != "1":
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


def show(value: Any) -> str:
    """A value as it is written in an override."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return f"[{','.join(map(show, value))}]"
    return str(value)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_devices(value: Any) -> bool:
    if isinstance(value, str):
        ids = value.strip().rstrip(",").split(",")
        return value == "auto" or value.strip() == "-1" or all(i.strip().isdigit() for i in ids)
    if isinstance(value, list):
        return bool(value) and all(is_int(i) and i >= 0 for i in value)
    return is_int(value) and (value >= 1 or value == -1)


@dataclass(frozen=True)
class Rule:
    allowed: str
    ok: Callable[[Any], bool]
    fix: str


def whole(low: int, fix: str, also: str = "", none: bool = False) -> Rule:
    allowed = f"a whole number >= {low}{also}" + (", or null" if none else "")
    return Rule(allowed, lambda v: (none and v is None) or (is_int(v) and v >= low), fix)


def flag(fix: str) -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool), fix)


def batches(fix: str) -> Rule:
    return Rule(
        "a fraction of the batches in [0.0, 1.0] or a whole number of batches >= 0",
        lambda v: (is_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0),
        fix,
    )


def one_of(choices: tuple, fix: str) -> Rule:
    allowed = f"one of {', '.join(dict.fromkeys(map(show, choices)))}"
    return Rule(allowed, lambda v: v in choices and not isinstance(v, bool), fix)


# Lightning's own spellings (Trainer's `precision` and `accelerator` arguments).
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", 16, 32, 64, "bf16")
PRECISIONS += tuple(map(str, PRECISIONS[6:9]))
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")

# The keys this project knows. Other keys pass through: `+trainer.X=...` reaches Lightning, which
# rejects what it does not know.
RULES: dict[str, Rule] = {
    "seed": Rule(
        "a whole number in [0, 4294967295], or null", lambda v: v is None or (is_int(v) and 0 <= v < 2**32), "42"
    ),
    "task.optimizer.lr": Rule("a finite number > 0", lambda v: is_number(v) and v > 0, "5e-05"),
    "task.optimizer.weight_decay": Rule("a finite number >= 0", lambda v: is_number(v) and v >= 0, "0.2"),
    "task.optimizer._partial_": Rule(
        "true, since the task passes the model's parameters to the optimizer", lambda v: v is True, "true"
    ),
    "task.scheduler.max_lr": Rule("a finite number > 0", lambda v: is_number(v) and v > 0, "0.003"),
    "task.loss_function.label_smoothing": Rule("a number in [0.0, 1.0)", lambda v: is_number(v) and 0 <= v < 1, "0.1"),
    "task.compile": flag("false"),
    "task.model.backbone.pretrained": flag("false"),
    "task.model.adapter.in_features": whole(1, "512"),
    "task.model.adapter.out_features": Rule("10, one logit per digit", lambda v: is_int(v) and v == 10, "10"),
    "data_module.batch_size": whole(1, "64"),
    "data_module.num_workers": whole(0, "0", " (0 loads batches in the main process)"),
    "data_module.pin_memory": flag("false"),
    "data_module.drop_last": flag("true"),
    "data_module.augment": flag("false"),
    "data_module.data_dir": Rule("a folder path", lambda v: isinstance(v, str) and bool(v.strip()), "./data/mnist"),
    "trainer.max_epochs": Rule(
        "a whole number >= 1, or -1 for no limit", lambda v: is_int(v) and (v >= 1 or v == -1), "10"
    ),
    "trainer.min_epochs": whole(0, "1", none=True),
    "trainer.max_steps": Rule(
        "a whole number >= 1, or -1 for no limit", lambda v: is_int(v) and (v >= 1 or v == -1), "-1"
    ),
    "trainer.log_every_n_steps": whole(1, "10"),
    "trainer.accelerator": one_of(ACCELERATORS, "cpu"),
    "trainer.devices": Rule(
        "a number of devices >= 1, -1 for all, a list of device ids such as [0,1], or auto", is_devices, "1"
    ),
    "trainer.precision": one_of(PRECISIONS, "32-true"),
    "trainer.fast_dev_run": Rule(
        "true, false or a whole number of batches >= 1",
        lambda v: isinstance(v, bool) or (is_int(v) and v >= 0),
        "true",
    ),
    "trainer.limit_train_batches": batches("1.0"),
    "trainer.limit_val_batches": batches("1.0"),
    "trainer.limit_test_batches": batches("1.0"),
    "trainer.limit_predict_batches": batches("1.0"),
    "trainer.overfit_batches": batches("0"),
    "trainer.val_check_interval": Rule("a number > 0, or null", lambda v: v is None or (is_number(v) and v > 0), "1.0"),
    "trainer.check_val_every_n_epoch": whole(1, "1", none=True),
    "trainer.num_sanity_val_steps": whole(-1, "2", " (-1 runs the whole validation set)"),
    "trainer.accumulate_grad_batches": whole(1, "1"),
    "trainer.gradient_clip_val": Rule(
        "a number >= 0, or null", lambda v: v is None or (is_number(v) and v >= 0), "1.0"
    ),
    "trainer.gradient_clip_algorithm": one_of(("norm", "value"), "norm"),
    "trainer.deterministic": Rule(
        "true, false or warn", lambda v: v is None or isinstance(v, bool) or v == "warn", "true"
    ),
    "trainer.enable_checkpointing": flag("true"),
    "trainer.enable_progress_bar": flag("true"),
    "trainer.enable_model_summary": flag("true"),
    "trainer.benchmark": flag("false"),
    "trainer.inference_mode": flag("true"),
    "trainer.detect_anomaly": flag("false"),
}


_ABSENT = object()


def validate(cfg: DictConfig, project_dir: Path) -> None:
    """Raise ConfigError for the first value in `cfg` that cannot work.

    Checks each known key's type and range, that every `_target_` names something that exists,
    that the adapter fits the backbone, and that `data_dir` can hold MNIST. A relative `data_dir`
    is taken from `project_dir`, as `train` does.
    """
    for key, rule in RULES.items():
        value = lookup(cfg, key)
        if value is not _ABSENT and not rule.ok(value):
            raise ConfigError(f"{key}={show(value)}: {rule.allowed}; fix: {key}={rule.fix}")
    for key, target in targets(OmegaConf.to_container(cfg, resolve=False)):
        check_target(key, target, project_dir)
    check_adapter_width(cfg, project_dir)
    if lookup(cfg, "data_module.data_dir") is not _ABSENT:
        check_data_dir(cfg.data_module.data_dir, project_dir)


def lookup(cfg: DictConfig, key: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=True)
    except Exception as err:  # any interpolation failure; the key is what the user needs
        raise ConfigError(f"{key}: cannot be resolved ({err}); fix: give {key} a plain value") from err
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def targets(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            child = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield child, value
            else:
                yield from targets(value, child)


def check_target(key: str, target: Any, project_dir: Path) -> None:
    """`_target_` must name a callable that exists. Found by reading the source, not importing it."""
    if isinstance(target, str) and "${" in target:
        return
    if not isinstance(target, str) or not all(part.isidentifier() for part in target.split(".")):
        raise ConfigError(f"{key}={show(target)}: a dotted Python name such as backbones.ResNet18; fix: {key}=<name>")
    parts = target.split(".")
    found = module_source(parts[0], project_dir)
    if found is None:
        raise ConfigError(f"{key}={target}: there is no Python module named {parts[0]}; fix: {key}=<existing name>")
    depth = 1
    while depth < len(parts) and found.is_dir():  # a package: descend while the next part is a submodule
        sub = module_file(found, parts[depth])
        if sub is None:
            break
        found, depth = sub, depth + 1
    source = found / "__init__.py" if found.is_dir() else found
    if depth == len(parts) or source.suffix != ".py" or not source.is_file():
        return  # a module itself, or compiled code we cannot read: leave it to instantiate
    names, open_ended = top_level_names(source)
    name = parts[depth]
    if open_ended or name in names:
        return
    module = ".".join(parts[:depth])
    public = sorted(n for n, kind in names.items() if kind == "class" and not n.startswith("_"))
    close = difflib.get_close_matches(name, [n for n in names if not n.startswith("_")], n=3)
    if source.parent == project_dir and public:
        allowed = f"{module}.py defines {', '.join(public)}"
    else:
        allowed = f"{module} has no {name}" + (f" (close: {', '.join(close)})" if close else "")
    fix = f"{module}.{close[0] if close else (public[0] if public else '<name>')}"
    raise ConfigError(f"{key}={target}: {allowed}; fix: {key}={fix}")


def module_source(name: str, project_dir: Path) -> Path | None:
    """The file or package folder of a top-level module, looked up the way `import` would."""
    local = module_file(project_dir, name)
    if local is not None:
        return local
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin) if spec.origin else project_dir / name


def module_file(folder: Path, name: str) -> Path | None:
    if (folder / name / "__init__.py").is_file():
        return folder / name
    if (folder / f"{name}.py").is_file():
        return folder / f"{name}.py"
    if (folder / name).is_dir():  # a namespace package
        return folder / name
    compiled = [p for p in folder.glob(f"{name}.*") if p.suffix in (".so", ".pyd")]
    return compiled[0] if compiled else None


def top_level_names(source: Path) -> tuple[dict[str, str], bool]:
    """Names a module defines at its top level, and whether it may define more at run time
    (`from x import *`, a module `__getattr__`)."""
    names: dict[str, str] = {}
    open_ended = False

    def visit(statements: list[ast.stmt]) -> None:
        nonlocal open_ended
        for node in statements:
            if isinstance(node, ast.ClassDef):
                names[node.name] = "class"
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names[node.name] = "function"
                open_ended |= node.name == "__getattr__"
            elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    for leaf in ast.walk(target):
                        if isinstance(leaf, ast.Name):
                            names[leaf.id] = "value"
            elif isinstance(node, ast.Import | ast.ImportFrom):
                for alias in node.names:
                    open_ended |= alias.name == "*"
                    names[alias.asname or alias.name.split(".")[0]] = "import"
            elif isinstance(node, ast.If | ast.Try | ast.With):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                visit(getattr(node, "finalbody", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(ast.parse(source.read_bytes(), filename=str(source)).body)
    return names, open_ended


def source_constant(source: Path, name: str) -> Any:
    """A literal assigned at the top level of `source`, or None. Importing the module would import torch."""
    try:
        tree = ast.parse(source.read_bytes())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                return None
    return None


def check_adapter_width(cfg: DictConfig, project_dir: Path) -> None:
    """Every backbone in backbones.py gives `backbones.FEATURES` features; the adapter must take as many."""
    backbone = lookup(cfg, "task.model.backbone._target_")
    wanted = lookup(cfg, "task.model.adapter.in_features")
    if not isinstance(backbone, str) or not backbone.startswith("backbones.") or wanted is _ABSENT:
        return
    width = source_constant(project_dir / "backbones.py", "FEATURES")
    if is_int(width) and wanted != width:
        key = "task.model.adapter.in_features"
        raise ConfigError(
            f"{key}={show(wanted)} but {backbone} gives {width} features: the adapter must take the backbone's "
            f"width; fix: {key}={width}"
        )


def check_data_dir(data_dir: str, project_dir: Path) -> None:
    """MNIST must be there already, or the folder must be one this process can create and write."""
    key = "data_module.data_dir"
    path = project_dir / Path(data_dir).expanduser()
    raw_files = source_constant(project_dir / "mnist_files.py", "RAW_FILES") or {}
    if raw_files and all((path / "MNIST" / "raw" / name).is_file() for name in raw_files):
        return  # a read-only copy of the data is fine: nothing will be written
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        reason = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = f"{existing} cannot be written, and MNIST is not there yet"
    else:
        return
    allowed = f"a folder that holds MNIST or can be written ({reason})"
    raise ConfigError(f"{key}={data_dir}: {allowed}; fix: {key}=./data/mnist")


def check_group_choices(args: list[str], config_dir: Path) -> None:
    """A config-group option must exist: `task.model.backbone=resnet99` names the options there are.

    Hydra itself would also stop, with exit code 1 and a message about its search path.
    """
    for arg in args:
        key, equals, value = arg.partition("=")
        name = key.lstrip("+~")
        group = config_dir / name.replace(".", "/")
        # hydra/... groups are Hydra's own, with options that installed plugins add.
        if not equals or not name or name.startswith("-") or name.startswith("hydra") or not group.is_dir():
            continue
        if any(c in value for c in "()[]{}'\"$"):  # sweep functions, quoting, interpolation: Hydra's to parse
            continue
        options = sorted(p.stem for p in group.glob("*.yaml"))
        for choice in value.split(","):
            if choice.strip() not in (*options, "null"):
                raise ConfigError(f"{key}={value}: {name} is one of {', '.join(options)}; fix: {key}={options[0]}")


def check_accelerator(trainer: DictConfig) -> None:
    """Stop at once when the trainer asks for a GPU that PyTorch cannot see."""
    if trainer.get("accelerator") not in ("gpu", "cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={trainer.accelerator} but PyTorch sees no CUDA GPU here; "
            "train on the CPU with trainer=cpu"
        )
