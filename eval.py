"""Test a checkpoint written by train.py on MNIST's test set; print its accuracy and loss.

    python eval.py ckpt_path=outputs/DATE/TIME/checkpoints/last.ckpt
    python eval.py ckpt_path=last                             # the newest last.ckpt of any run
    python eval.py ckpt_path=PATH trainer=cpu data_module.batch_size=256

The model is rebuilt from the config stored in the checkpoint, so the checkpoint and the data are
all it needs. The data module and trainer come from configs/ with the checkpoint's recorded
overrides first (a run trained with trainer=cpu is tested on the CPU); overrides given here win.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from train import (
    PROJECT_DIR,
    group_overrides,
    merge_overrides,
    override_key,
    quoted,
    resolve_checkpoint,
)
from validation import ConfigError, check_accelerator, exit_on_config_error

log = logging.getLogger(__name__)


def eval_overrides(args: list[str]) -> list[str]:
    """`ckpt_path=last` or a path, as a file, after the overrides its run was trained with."""
    args = group_overrides(args)
    value = next((arg.partition("=")[2] for arg in args if override_key(arg) == "ckpt_path"), None)
    if value is None:
        return args
    path = resolve_checkpoint(value)
    import torch

    recorded = torch.load(path, map_location="cpu", mmap=True).get("overrides", [])
    given = [f"++ckpt_path={quoted(path)}" if override_key(arg) == "ckpt_path" else arg for arg in args]
    return merge_overrides(recorded, given)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test the checkpoint at `cfg.ckpt_path` and return Lightning's test metrics."""
    if cfg.get("ckpt_path") is None:
        raise ConfigError("ckpt_path is not set; give a checkpoint: python eval.py ckpt_path=PATH (or ckpt_path=last)")
    check_accelerator(cfg.trainer)

    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from checkpoints import load_task
    from reports import progress_bar

    task, _ = load_task(cfg.ckpt_path)
    log.info("Loaded task <%s> from %s", cfg.task._target_, cfg.ckpt_path)
    datamodule = instantiate(cfg.data_module, data_dir=str(PROJECT_DIR / cfg.data_module.data_dir))
    trainer = instantiate(
        cfg.trainer,
        default_root_dir=HydraConfig.get().runtime.output_dir,
        logger=False,
        enable_checkpointing=False,
        callbacks=[progress_bar()],
    )
    metrics = trainer.test(task, datamodule=datamodule)[0]
    print(f"test accuracy: {metrics['test/acc']:.4f} test loss: {metrics['test/loss']:.4f} ({cfg.ckpt_path})")
    return metrics


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        metrics = evaluate(cfg)
    except Exception as err:
        exit_on_config_error(err)
        raise
    return metrics["test/acc"]


if __name__ == "__main__":
    try:
        sys.argv[1:] = eval_overrides(sys.argv[1:])
    except ConfigError as err:
        exit_on_config_error(err)
        raise
    main()
