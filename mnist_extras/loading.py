"""Checkpoints read as data: the task a checkpoint of train.py holds, rebuilt without running its code.

train.py stores the task's config as the checkpoint's `hyper_parameters`, so Lightning's own
`MNISTClassification.load_from_checkpoint(path)` rebuilds the task. A `_target_` can name any
callable (`torch.load` with weights_only=false runs a pickle), so before anything is built every
`_target_` in the stored config is checked against `tasks.PARTS`, and the file is read with
`weights_only=True`: no object is unpickled. Anything that is not a checkpoint of this project ends
in one `ConfigError` line naming the file and what it holds instead.
"""

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mnist_extras.errors import ConfigError

FIX = "pass a checkpoint written by train.py"
RUN_ROOTS = (Path("outputs"), Path("multirun"))  # where Hydra puts runs and sweeps, from the current folder
PARTS_OF_A_TASK = ("model", "optimizer", "loss_function")


def resolve(value: str, roots: tuple[Path, ...] = RUN_ROOTS) -> Path:
    """`ckpt_path=last` (the newest `checkpoints/last.ckpt` of any run under `roots`) or a path, as a file."""
    if value == "last":
        found = [path for root in roots if root.is_dir() for path in root.glob("**/checkpoints/last.ckpt")]
        if not found:
            raise ConfigError(
                f"ckpt_path=last: there is no checkpoints/last.ckpt under {' or '.join(map(str, roots))} here; "
                "fix: run from the folder that holds outputs/, or give the file"
            )
        return max(found, key=lambda path: path.stat().st_mtime).resolve()
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={value}: no such file; fix: {FIX} (or ckpt_path=last)")
    return path


def refused(path: Path, problem: str) -> ConfigError:
    return ConfigError(f"ckpt_path={path}: {problem}; fix: {FIX}")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at `path`, its tensors memory-mapped, if train.py wrote it; ConfigError otherwise."""
    import torch

    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        # torch's message advises weights_only=False, which would run the file's code: not repeated.
        raise refused(path, "it holds objects other than tensors and plain values, so it was not unpickled") from None
    except Exception:  # torch raises RuntimeError for most, but any failure here means the same
        raise refused(path, what_file(path)) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise refused(path, f"it holds a {type(checkpoint).__name__} of torch data, not a Lightning checkpoint")
    task_cfg = checkpoint.get("hyper_parameters")
    if not task_cfg:
        raise refused(path, "it holds weights but no hyper_parameters (the task's config), so no model to put them in")
    if not isinstance(task_cfg, Mapping) or not all(isinstance(task_cfg.get(k), Mapping) for k in PARTS_OF_A_TASK):
        raise refused(path, f"its hyper_parameters are not a task config ({', '.join(PARTS_OF_A_TASK)})")
    check_parts(path, {key: value for key, value in task_cfg.items() if key != "_target_"})
    return checkpoint


def what_file(path: Path) -> str:
    """What a file that torch cannot read as a checkpoint is, told by its first bytes."""
    with path.open("rb") as f:
        head = f.read(8)
    if not head:
        return "the file is empty"
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff"):
        return "it is an image, not a checkpoint"
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            return "it is cut short or damaged (a write that did not finish, or a copy still under way)"
        return "it is a zip archive but not one torch.save wrote"
    if head.startswith(b"\x80"):
        return "it is a pickle, not a checkpoint (it was not unpickled)"
    try:
        path.read_text(encoding="utf-8")
        return "it is a text file, not a checkpoint"
    except UnicodeDecodeError:
        return "it is not a file torch.save wrote"


def check_parts(path: Path, task_cfg: Mapping) -> None:
    """Every `_target_` in the stored task config is one of tasks.PARTS, else the first other one is named."""
    from tasks import PARTS

    stack: list[tuple[str, Any]] = [("", task_cfg)]
    while stack:
        key, node = stack.pop()
        if isinstance(node, Mapping):
            target = node.get("_target_")
            if target is not None and target not in PARTS:
                raise refused(path, f"its hyper_parameters name _target_={target} at {key}, not a part of this project")
            stack.extend((f"{key}.{name}".lstrip("."), value) for name, value in node.items())
        elif isinstance(node, list | tuple):
            stack.extend((f"{key}[{i}]", value) for i, value in enumerate(node))


def load_task(path: str | Path) -> Any:
    """The task a checkpoint of train.py holds, in eval mode on the CPU (see the module docstring)."""
    from hydra.errors import InstantiationException

    from tasks import MNISTClassification, UnknownPart

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
    except UnknownPart as err:  # checked above; tasks.py checks again as it builds
        raise refused(path, str(err)) from None
    except (InstantiationException, RuntimeError, TypeError, ValueError) as err:
        # Allowed parts that do not fit each other or the stored weights (arguments, keys, sizes).
        first = re.sub(r"\s+", " ", str(err).splitlines()[0] if str(err) else type(err).__name__)[:200]
        raise refused(path, f"its hyper_parameters do not build the model its weights are for ({first})") from None
    return task.eval()
