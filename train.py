"""Train an MNIST classifier that Hydra composes from configs/, then test its best checkpoint (README.md: commands)."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).parent / "configs"
TARGETS = [f"{p.stem}.*" for p in sorted(CONFIG_DIR.parent.iterdir()) if p.suffix == ".py" or any(p.glob("*.py"))]
TARGETS += ["torch.optim.*", "pytorch_lightning.*"]  # Hydra's execution whitelist: what a `_target_` may name


def train(cfg: DictConfig) -> dict[str, float]:
    import pytorch_lightning as pl
    from pytorch_lightning.utilities import rank_zero_info as say  # once, not once per DDP process
    run_dir = HydraConfig.get().runtime.output_dir
    pl.seed_everything(cfg.get("seed", 0), workers=True, verbose=False)
    built = {}
    for group in ("task", "data_module", "callbacks", "logger"):  # an option of the last two: one node per object
        for node in [cfg[group]] if group in ("task", "data_module") else (cfg.get(group) or {}).values():
            say(f"Instantiating {group} <{node._target_}>")
            built.setdefault(group, []).append(instantiate(node))
    (task,), (datamodule,) = built["task"], built["data_module"]
    task.hparams.update(OmegaConf.to_container(cfg.task, resolve=True))  # for Task.load_from_checkpoint(path)
    kept = pl.callbacks.ModelCheckpoint(f"{run_dir}/checkpoints", monitor="val/acc", mode="max", save_last=True)
    callbacks = built.get("callbacks", [kept])  # what a run keeps with no `callbacks` or `logger` option
    loggers = built.get("logger", [pl.loggers.CSVLogger(run_dir, name="", version="")])  # <run_dir>/metrics.csv
    say(f"Instantiating trainer <{cfg.trainer._target_}>")
    trainer = instantiate(cfg.trainer, default_root_dir=run_dir, callbacks=callbacks, logger=loggers)
    trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fitted = dict(trainer.callback_metrics)  # trainer.test starts them afresh
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""  # none: fast_dev_run
    trainer.test(task, datamodule=datamodule, ckpt_path=best or None, weights_only=True, verbose=False)
    metrics = {name: float(value) for name, value in {**fitted, **trainer.callback_metrics}.items()}
    say(f"test accuracy: {metrics.get('test/acc', float('nan')):.4f} ({best or 'last weights'})")  # nan: no test ran
    return metrics


@hydra.main(config_path="configs", config_name="config", execution_whitelist=TARGETS)
def main(cfg: DictConfig) -> dict[str, float] | float:
    metrics = train(cfg)  # Hydra hands the return value to its callbacks (run.json) and to a search's sweeper
    return metrics[cfg.optimized_metric] if "optimized_metric" in cfg else metrics


def as_group_choice(arg: str) -> str:  # the spec's `task.model.backbone=resnet50` is `task/model/backbone=resnet50`
    key, equals, value = arg.partition("=")
    group = CONFIG_DIR / key.lstrip("+~").replace(".", "/")
    return f"{key.replace('.', '/')}={value}" if equals and "." in key and value[:1] != "{" and group.is_dir() else arg


if __name__ == "__main__":
    sys.argv[1:] = [as_group_choice(arg) for arg in sys.argv[1:]]
    try:
        main()
    except SystemExit as stop:  # Hydra exits 1, in the `except` that caught it, for a config it cannot compose: 2
        sys.exit(2 if isinstance(stop.__context__, ConfigCompositionException | OverrideParseException) else stop.code)
