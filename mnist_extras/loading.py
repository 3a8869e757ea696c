"""Checkpoints read as data: `weights_only=True`, and every `_target_` of the stored task config checked
against `tasks.PARTS` (it can name any callable) before anything is built; else one `ConfigError` line."""

import fnmatch
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mnist_extras.errors import ConfigError

RUN_ROOTS = (Path("outputs"), Path("multirun"))  # where Hydra puts runs and sweeps, from the current folder
PARTS_OF_A_TASK = ("model", "optimizer", "loss_function")


def resolve(value: str, roots: tuple[Path, ...] = RUN_ROOTS) -> Path:
    """`last` (the newest `checkpoints/last.ckpt` under `roots`) or a path, as a file."""
    if value == "last":
        if not (found := [path for root in roots for path in root.glob("**/checkpoints/last.ckpt")]):
            raise ConfigError(
                f"ckpt_path=last: there is no checkpoints/last.ckpt under {' or '.join(map(str, roots))} here; "
                "fix: run from the folder that holds outputs/, or give the file"
            )
        return max(found, key=lambda path: path.stat().st_mtime).resolve()
    if not (path := Path(value).expanduser().resolve()).is_file():
        raise refused(value, "no such file")
    return path


def refused(path: Path | str, problem: str) -> ConfigError:
    return ConfigError(f"ckpt_path={path}: {problem}; fix: pass a checkpoint written by train.py")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at `path`, its tensors memory-mapped, if train.py wrote it; ConfigError otherwise."""
    import torch

    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # torch's message advises weights_only=False, which runs the file's code
        raise refused(path, "it holds objects other than tensors and plain values, so it was not unpickled") from None
    except Exception:  # mostly RuntimeError, but any failure here means the same
        raise refused(path, what_file(path)) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise refused(path, f"it holds a {type(checkpoint).__name__} of torch data, not a Lightning checkpoint")
    if not (task_cfg := checkpoint.get("hyper_parameters")):
        raise refused(path, "it holds weights but no hyper_parameters (the task's config), so no model to put them in")
    if not isinstance(task_cfg, Mapping) or not all(isinstance(task_cfg.get(k), Mapping) for k in PARTS_OF_A_TASK):
        raise refused(path, f"its hyper_parameters are not a task config ({', '.join(PARTS_OF_A_TASK)})")
    check_parts(path, {key: value for key, value in task_cfg.items() if key != "_target_"})
    return checkpoint


def what_file(path: Path) -> str:
    """What a file that torch cannot read is, told by its first bytes."""
    with path.open("rb") as f:
        head = f.read(8)
    if not head:
        return "the file is empty"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff")):
        return "it is an image, not a checkpoint"
    if head.startswith(b"\x80"):
        return "it is a pickle, not a checkpoint (it was not unpickled)"
    if head.startswith(b"PK") and zipfile.is_zipfile(path):
        return "it is a zip archive but not one torch.save wrote"
    if head.startswith(b"PK"):
        return "it is cut short or damaged (a write that did not finish, or a copy still under way)"
    try:
        path.read_text(encoding="utf-8")
        return "it is a text file, not a checkpoint"
    except UnicodeDecodeError:
        return "it is not a file torch.save wrote"


def check_parts(path: Path, node: Any, key: str = "") -> None:
    """Every `_target_` in the stored task config is one of tasks.PARTS, else the first other is named."""
    from tasks import PARTS

    if isinstance(node, Mapping):
        if (target := node.get("_target_")) is not None and target not in PARTS:
            problem = f"its hyper_parameters name _target_={target} at {key}, not a part of this project"
            if yours(target):  # a part a user added to the project (a backbone, an optimizer) but not to PARTS
                raise ConfigError(f"ckpt_path={path}: {problem}; fix: if it is a part of yours, add it to tasks.PARTS")
            raise refused(path, problem)
        for name, value in node.items():
            check_parts(path, value, f"{key}.{name}".lstrip("."))
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            check_parts(path, value, f"{key}[{i}]")


def admitted(target: str, names: list[str]) -> bool:
    """Whether Hydra's execution whitelist `names` (exact names and `module.*`) lets a config name `target`."""
    return any(fnmatch.fnmatchcase(target, name) for name in names)


def yours(target: str) -> bool:
    """A name in the project's own modules or torch.optim, which train.py could have built; a checkpoint
    naming anything else (`torch.load`, Lightning's loaders) is no project's, whatever it says."""
    from train import TARGETS

    return admitted(target, [name for name in TARGETS if name != "pytorch_lightning.*"])


def load_task(path: str | Path) -> Any:
    """The task a checkpoint of train.py holds, in eval mode on the CPU."""
    from tasks import MNISTClassification

    path = Path(path)
    model = dict(read_checkpoint(path)["hyper_parameters"]["model"])
    if isinstance(model.get("backbone"), Mapping) and "pretrained" in model["backbone"]:
        # The weights come from the checkpoint: downloading ImageNet's first would be wasted (or fail offline).
        model["backbone"] = {**model["backbone"], "pretrained": False}
    try:
        # compile=False: a few images or one test pass; compiling would cost more and need a C++ compiler.
        task = MNISTClassification.load_from_checkpoint(
            path, map_location="cpu", weights_only=True, model=model, compile=False
        )
    except Exception as err:  # allowed parts that do not fit each other or the weights (arguments, keys, sizes)
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise refused(path, f"its hyper_parameters do not build the model its weights are for ({first})") from None
    return task.eval()
