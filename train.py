"""Train an MNIST classifier that Hydra composes from configs/, then test its best checkpoint.

    python train.py trainer=cpu                                        # train and test on the CPU
    python train.py task.model.backbone=resnet50                       # pick a config-group option
    python train.py task.optimizer.lr=0.001 data_module.batch_size=128 # change values
    python train.py -m task.model.backbone=resnet18,resnet34,resnet50  # one run per backbone
    python train.py --cfg job                                          # print the composed config
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONFIG_DIR = Path(__file__).parent / "configs"


def train(cfg: DictConfig) -> dict[str, float]:
    """Build the task, data and trainer that `cfg` names, fit, test the best checkpoint, return the metrics."""
    import pytorch_lightning as pl
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger
    from pytorch_lightning.utilities import rank_zero_info

    run_dir = HydraConfig.get().runtime.output_dir
    pl.seed_everything(cfg.get("seed", 0), workers=True, verbose=False)
    rank_zero_info(f"Instantiating task <{cfg.task._target_}>")
    task = instantiate(cfg.task)
    task.hparams.update(OmegaConf.to_container(cfg.task, resolve=True))  # for Task.load_from_checkpoint(path)
    rank_zero_info(f"Instantiating data module <{cfg.data_module._target_}>")
    datamodule = instantiate(cfg.data_module)
    callbacks, loggers = [], []
    for group, built in (("callbacks", callbacks), ("logger", loggers)):
        for node in (cfg.get(group) or {}).values():
            rank_zero_info(f"Instantiating {group} <{node._target_}>")
            built.append(instantiate(node))
    # With no `callbacks` or `logger` option: the best (by val/acc) and last checkpoints, and metrics.csv.
    callbacks = callbacks or [ModelCheckpoint(f"{run_dir}/checkpoints", monitor="val/acc", mode="max", save_last=True)]
    loggers = loggers or [CSVLogger(run_dir, name="", version="")]
    rank_zero_info(f"Instantiating trainer <{cfg.trainer._target_}>")
    trainer = instantiate(cfg.trainer, default_root_dir=run_dir, callbacks=callbacks, logger=loggers)

    trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""  # none: fast_dev_run
    trainer.test(task, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    rank_zero_info(f"test accuracy: {metrics['test/acc']:.4f} ({best or 'last weights'})")
    return metrics


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return train(cfg).get(cfg.get("optimized_metric"))  # what a hyper-parameter search maximises


def as_group_choice(arg: str) -> str:
    """The spec picks a group option as `task.model.backbone=resnet50`, Hydra as `task/model/backbone=resnet50`
    (a dotted key would replace the node with a string): spell it Hydra's way where that group exists."""
    key, equals, value = arg.partition("=")
    name = key.lstrip("+~")
    if equals and not value.startswith("{") and "." in name and (CONFIG_DIR / name.replace(".", "/")).is_dir():
        return key[: len(key) - len(name)] + name.replace(".", "/") + "=" + value
    return arg


if __name__ == "__main__":
    sys.argv[1:] = [as_group_choice(arg) for arg in sys.argv[1:]]
    main()
