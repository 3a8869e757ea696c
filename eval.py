"""Test a checkpoint written by train.py on MNIST's test set; print its accuracy.

    python eval.py ckpt_path=outputs/DATE/TIME/checkpoints/last.ckpt trainer=cpu    (or ckpt_path=last)

The data module and trainer come from this command line, the task from the checkpoint (mnist_extras/
loading.py). `ckpt_path=PATH` is checked before Hydra starts and passed on as `++ckpt_path='<file>'`:
a fixed point, so the processes Lightning's DDP launcher starts arrive at the same config.
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException, OverrideParseException
from hydra.utils import instantiate
from omegaconf import DictConfig

from mnist_extras.errors import ConfigError, quoted
from mnist_extras.loading import load_task, read_checkpoint, resolve
from train import TARGETS

log = logging.getLogger(__name__)
USAGE = "python eval.py ckpt_path=PATH trainer=cpu (or ckpt_path=last)"


def command_line(args: list[str]) -> list[str]:
    given = [arg for arg in args if arg.partition("=")[0].lstrip("+") == "ckpt_path"]
    if not given:
        if any(arg.startswith("-") for arg in args):  # --help, --cfg job, --info: no checkpoint needed
            return args
        raise ConfigError(f"ckpt_path is not set; fix: {USAGE}")
    path = resolve(hydra_value(given[-1].partition("=")[2]))
    read_checkpoint(path)
    return [arg for arg in args if arg not in given] + [f"++ckpt_path={quoted(path)}"]


def hydra_value(text: str) -> str:
    """A path as typed (Hydra's grammar would not take every character), a quoted one unquoted."""
    if text[:1] not in ("'", '"'):
        return text
    try:
        return OverridesParser.create().parse_override(f"ckpt_path={text}").value()
    except HydraException:
        raise ConfigError(f"ckpt_path={text}: an unfinished quote; fix: {USAGE}") from None


@hydra.main(config_path="configs", config_name="config", execution_whitelist=TARGETS)
def main(cfg: DictConfig) -> float:
    if cfg.get("ckpt_path") is None:  # `-m` without one
        raise ConfigError(f"ckpt_path is not set; fix: {USAGE}")
    task = load_task(cfg.ckpt_path)
    output_dir = HydraConfig.get().runtime.output_dir
    trainer = instantiate(cfg.trainer, default_root_dir=output_dir, logger=False, enable_checkpointing=False)
    metrics = trainer.test(task, datamodule=instantiate(cfg.data_module), verbose=False)[0]  # said once below
    images = int(task.test_confusion.compute().sum())  # summed over every process
    if trainer.is_global_zero:
        log.info("test accuracy: %.4f test loss: %.4f on %d test images (%s)",
                 metrics["test/acc"], metrics["test/loss"], images, cfg.ckpt_path)  # fmt: skip
    return metrics["test/acc"]


if __name__ == "__main__":
    try:
        sys.argv[1:] = command_line(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        main()
    except SystemExit as stop:  # as train.py: a config Hydra cannot compose is a usage error
        sys.exit(2 if isinstance(stop.__context__, ConfigCompositionException | OverrideParseException) else stop.code)
