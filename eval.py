"""Test a checkpoint written by train.py on MNIST's test set; print its accuracy and loss.

    python eval.py ckpt_path=outputs/DATE/TIME/checkpoints/last.ckpt
    python eval.py ckpt_path=last                             # the newest last.ckpt of any run
    python eval.py ckpt_path=PATH trainer=cpu data_module.batch_size=256

The model is rebuilt from the config stored in the checkpoint, so the checkpoint and the data are
all it needs. The data module and trainer come from configs/ with the checkpoint's recorded
overrides first (a run trained with trainer=cpu is tested on the CPU); overrides given here win.
"""

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from mnist_extras.errors import (
    ConfigError,
    exit_on_error,
    interrupt_exit_code,
    override_key,
    override_value,
    quoted,
    resolve_checkpoint,
)
from mnist_extras.errors import spell_for_hydra as spelled

log = logging.getLogger(__name__)
# Settings of the training run that limit what it tested (a debug preset limits batches and may
# profile); an evaluation tests the whole set unless its own command line limits it.
LIMITS = ("trainer.limit_test_batches", "trainer.fast_dev_run", "trainer.overfit_batches", "debug", "hparams_search")


def eval_command_line(args: list[str]) -> list[str]:
    """`ckpt_path=last` or a path, as a file, after the overrides its run was trained with (less
    what limited its testing). A fixed point, as train.py's, for Lightning's DDP processes."""
    from mnist_extras.errors import CONFIG_DIR

    args = [spelled(arg, CONFIG_DIR) for arg in args]
    value = next((override_value(arg) for arg in args if override_key(arg) == "ckpt_path"), None)
    if value is None:
        return args
    path = resolve_checkpoint(str(value))
    import torch

    recorded = torch.load(path, map_location="cpu", mmap=True, weights_only=True).get("overrides", [])
    given = [f"++ckpt_path={quoted(path)}" if override_key(arg) == "ckpt_path" else arg for arg in args]
    replaced = {override_key(arg) for arg in given} | set(LIMITS) | {"seed"}
    return [arg for arg in recorded if override_key(arg) not in replaced] + given


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test the checkpoint at `cfg.ckpt_path` and return Lightning's test metrics."""
    if cfg.get("ckpt_path") is None:
        raise ConfigError("ckpt_path is not set; fix: python eval.py ckpt_path=PATH (or ckpt_path=last)")

    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from mnist_extras.checkpoints import load_task
    from mnist_extras.records import progress_bar, quiet_libraries

    quiet_libraries()
    task, _ = load_task(cfg.ckpt_path)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # once, not once per process
        log.info("Loaded task <%s> from %s", cfg.task._target_, cfg.ckpt_path)
    datamodule = instantiate(cfg.data_module)
    trainer = instantiate(
        cfg.trainer,
        default_root_dir=HydraConfig.get().runtime.output_dir,
        logger=False,
        enable_checkpointing=False,
        callbacks=[progress_bar()],
    )
    metrics = trainer.test(task, datamodule=datamodule)[0]
    images = int(task.test_confusion.compute().sum())  # summed over every process
    if trainer.is_global_zero:
        log.info(
            "test accuracy: %.4f test loss: %.4f on %d test images (%s)",
            *(metrics["test/acc"], metrics["test/loss"], images, cfg.ckpt_path),
        )
    return {**metrics, "images": images}


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return evaluate(cfg)["test/acc"]
    except SystemExit as stop:
        raise SystemExit(interrupt_exit_code(stop)) from stop
    except Exception as err:
        exit_on_error(err)
        raise


if __name__ == "__main__":
    try:
        sys.argv[1:] = eval_command_line(sys.argv[1:])
    except Exception as err:
        exit_on_error(err)
        raise
    main()
