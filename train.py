"""Train an MNIST classifier whose parts Hydra composes from configs/.

    python train.py trainer=cpu task.model.backbone.pretrained=false   # train and test on CPU
    python train.py task.model.backbone=resnet50                       # pick a config-group option
    python train.py task.optimizer.lr=0.001 data_module.batch_size=128 # change values
    python train.py -m task.model.backbone=resnet18,resnet34,resnet50  # one run per backbone
    python train.py --cfg job                                          # print the composed config

torch and Lightning are imported inside `train`, so printing a config or --help stays instant.
"""

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import hydra
from omegaconf import DictConfig

from validation import ConfigError, check_accelerator

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PROJECT_DIR / "configs"


def group_overrides(args: list[str], config_dir: Path = CONFIG_DIR) -> list[str]:
    """Spell `task.model.backbone=resnet50` as Hydra's `task/model/backbone=resnet50`.

    The spec selects config-group options with dots; plain Hydra would read that as "replace
    the backbone node with the string 'resnet50'". Only keys that name a folder under configs/
    are rewritten, so value overrides such as `task.optimizer.lr=0.001` are left as they are.
    """
    rewritten = []
    for arg in args:
        key, equals, value = arg.partition("=")
        name = key.lstrip("+~")
        prefix = key[: len(key) - len(name)]
        if equals and "." in name and "/" not in name and (config_dir / name.replace(".", "/")).is_dir():
            arg = f"{prefix}{name.replace('.', '/')}={value}"
        rewritten.append(arg)
    return rewritten


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured task, test its best checkpoint, and return the metrics."""
    check_accelerator(cfg.trainer)

    import pytorch_lightning as pl
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    log.info("Instantiating task <%s>", cfg.task._target_)
    task = instantiate(cfg.task)
    log.info("Instantiating data module <%s>", cfg.data_module._target_)
    # A relative data_dir is the project's own folder, shared by every run, not a per-run copy.
    datamodule = instantiate(cfg.data_module, data_dir=str(PROJECT_DIR / cfg.data_module.data_dir))
    log.info("Instantiating trainer <%s>", cfg.trainer._target_)
    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="epoch{epoch:02d}-val_acc{val/acc:.4f}",
        auto_insert_metric_name=False,
        monitor="val/acc",
        mode="max",
        save_last=True,
    )
    trainer = instantiate(
        cfg.trainer,
        default_root_dir=str(output_dir),
        callbacks=[checkpoint],
        logger=CSVLogger(output_dir, name="", version=""),
    )

    started = time.perf_counter()
    with ddp_ranks_run_this_job():
        trainer.fit(task, datamodule=datamodule)
        fit_seconds = time.perf_counter() - started
        best = checkpoint.best_model_path or None  # None under fast_dev_run, which saves nothing
        test_metrics = trainer.test(task, datamodule=datamodule, ckpt_path=best)[0]

    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    metrics.update(test_metrics)
    if checkpoint.best_model_score is not None:
        metrics["val/acc_best"] = float(checkpoint.best_model_score)
    metrics["fit_seconds"] = fit_seconds
    if trainer.is_global_zero:
        print(f"test accuracy: {metrics['test/acc']:.4f} ({best or 'last weights'}; fit took {fit_seconds:.0f} s)")
    return metrics


# What Lightning's DDP launcher sets in the process that starts the other ranks.
DDP_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def ddp_ranks_run_this_job() -> Iterator[None]:
    """Make Lightning's DDP launcher start the other ranks on this job alone, in its directory.

    The launcher starts rank 1.. by re-running `sys.argv` (as `python -m <__main__'s module>`
    when there is one) with `hydra.run.dir=` Hydra's run dir. In a multirun, `sys.argv` is the
    whole sweep and the run dir is not the job's folder, so each rank would start the sweep again
    elsewhere; in a joblib or submitit worker, `__main__` is the worker's own module. The launcher
    also leaves its variables and process group behind, and the next job in this process would
    wait forever for ranks that have exited. A single run needs none of this.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import read_write

    import __main__

    hydra_cfg = HydraConfig.get()
    # LOCAL_RANK set: a rank that a launcher started (Lightning's own, torchrun), not a job.
    if hydra_cfg.mode != RunMode.MULTIRUN or "LOCAL_RANK" in os.environ:
        yield
        return
    argv, spec = sys.argv, __main__.__spec__
    sys.argv = [str(PROJECT_DIR / "train.py"), *hydra_cfg.overrides.task]
    __main__.__spec__ = None
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv, __main__.__spec__ = argv, spec
        import torch.distributed

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name in DDP_LAUNCH_ENV:
            os.environ.pop(name, None)


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except Exception as err:
        cause = config_error_in(err)
        if cause is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)
    return metrics.get("val/acc_best")


def config_error_in(err: BaseException | None) -> ConfigError | None:
    """The ConfigError behind `err`, which `instantiate` wraps in an InstantiationException."""
    while err is not None and not isinstance(err, ConfigError):
        err = err.__cause__
    return err


if __name__ == "__main__":
    sys.argv[1:] = group_overrides(sys.argv[1:])
    main()
