"""Test a checkpoint written by train.py on MNIST's test set; print its accuracy.

    python eval.py ckpt_path=outputs/DATE/TIME/checkpoints/last.ckpt trainer=cpu
    python eval.py ckpt_path=last trainer=cpu               # the newest last.ckpt under outputs/ or multirun/
    python eval.py ckpt_path=PATH data_module.batch_size=256 +trainer.limit_test_batches=10

A small Hydra app on configs/: the data module and the trainer are composed from this command line
alone (the config's defaults: trainer=gpu unless you say trainer=cpu), the task comes from the
checkpoint (mnist_extras/loading.py: Lightning's `load_from_checkpoint`, every `_target_` checked
against the project's parts, no object unpickled). The run's recorded overrides are not replayed.

`ckpt_path` is not in config.yaml, so plain Hydra spells it `+ckpt_path=PATH`; that works, and so
does `ckpt_path=PATH`, the spelling train.py prints: before Hydra starts, `command_line` reads the
checkpoint (a file that is not one of this project's ends here, in one line, exit code 2) and
passes it on as `++ckpt_path='<absolute path>'`. The result is a fixed point, so the processes
Lightning's DDP launcher starts with the same command line arrive at the same config.
"""

import logging
import re
import sys

import hydra
from omegaconf import DictConfig

from mnist_extras.errors import ConfigError

log = logging.getLogger(__name__)
USAGE = "python eval.py ckpt_path=PATH trainer=cpu (or ckpt_path=last)"


def command_line(args: list[str]) -> list[str]:
    """`ckpt_path=PATH|last` (or `+`/`++ckpt_path=`) as `++ckpt_path='<file>'`, once the file is
    known to be a checkpoint of this project; ConfigError for anything else."""
    from mnist_extras.loading import read_checkpoint, resolve

    given = [arg for arg in args if arg.partition("=")[0].lstrip("+") == "ckpt_path"]
    if not given:
        if any(arg.startswith("-") for arg in args):  # --help, --cfg job, --info: Hydra's, no checkpoint needed
            return args
        raise ConfigError(f"ckpt_path is not set; fix: {USAGE}")
    path = resolve(hydra_value(given[-1].partition("=")[2]))
    read_checkpoint(path)
    return [arg for arg in args if arg not in given] + [f"++ckpt_path={quoted(str(path))}"]


def hydra_value(text: str) -> str:
    """A value as typed: a path as it is, a Hydra-quoted one (as command_line writes it) unquoted."""
    if text[:1] not in ("'", '"'):
        return text  # unquoted: any character a path may hold, which Hydra's grammar would not all take
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_override(f"ckpt_path={text}").value()
    except HydraException:  # the grammar's lexer and parser errors alike
        raise ConfigError(f"ckpt_path={text}: an unfinished quote; fix: {USAGE}") from None


def quoted(text: str) -> str:
    """Single-quoted for Hydra, which unescapes a backslash only before a quote or at the end."""
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text) + "'"


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test the checkpoint at `cfg.ckpt_path` with the data module and trainer `cfg` names."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from mnist_extras.loading import load_task

    if cfg.get("ckpt_path") is None:
        raise ConfigError(f"ckpt_path is not set; fix: {USAGE}")
    task = load_task(cfg.ckpt_path)
    datamodule = instantiate(cfg.data_module)
    trainer = instantiate(
        cfg.trainer, default_root_dir=HydraConfig.get().runtime.output_dir, logger=False, enable_checkpointing=False
    )
    metrics = trainer.test(task, datamodule=datamodule, verbose=False)[0]  # verbose: the line below says it once
    images = int(task.test_confusion.compute().sum())  # summed over every process
    if trainer.is_global_zero:
        log.info(
            "test accuracy: %.4f test loss: %.4f on %d test images (%s)",
            *(metrics["test/acc"], metrics["test/loss"], images, cfg.ckpt_path),
        )
    return {**metrics, "images": images}


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float:
    return evaluate(cfg)["test/acc"]


if __name__ == "__main__":
    try:
        sys.argv[1:] = command_line(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
