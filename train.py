"""Train an MNIST classifier whose parts Hydra composes from configs/.

    python train.py trainer=cpu task.model.backbone.pretrained=false   # train and test on CPU
    python train.py task.model.backbone=resnet50                       # pick a config-group option
    python train.py task.optimizer.lr=0.001 data_module.batch_size=128 # change values
    python train.py -m task.model.backbone=resnet18,resnet34,resnet50  # one run per backbone
    python train.py --cfg job                                          # print the composed config
    python train.py trainer=cpu seed=3                                 # a repeatable CPU run
    python train.py debug=fdr trainer=cpu                              # one batch of everything (configs/debug/)
    python train.py ckpt_path=last                                     # continue the newest run
    python train.py -m hparams_search=mnist_optuna                     # Optuna search on val/acc

torch and Lightning are imported inside `train`, so printing a config or --help stays instant.
Before a run starts, configs/config.yaml's Hydra callbacks check the config (validation.py) and,
in a sweep, launch each job as its own `train.py` process (hydra_plugins/subprocess_launcher.py).
"""

import hashlib
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cli import ConfigError, command_line, exit_on_error, interrupt_exit_code

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured task, test its best checkpoint, and return the run's metrics."""
    import pytorch_lightning as pl
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from checkpoints import AtomicCheckpointIO
    from reports import RunRecord, print_config, quiet_libraries

    quiet_libraries()
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    record = RunRecord(run_dir, cfg, list(hydra_cfg.overrides.task), run_seed(cfg, run_dir))
    with record.failures():
        print_config(cfg, run_dir)
        pl.seed_everything(record.seed, workers=True, verbose=False)
        say = log.info if pl.utilities.rank_zero_only.rank == 0 else log.debug  # once, not once per process
        say("Instantiating task <%s>", cfg.task._target_)
        task = instantiate(cfg.task)
        say("Instantiating data module <%s>", cfg.data_module._target_)
        datamodule = instantiate(cfg.data_module)
        say("Instantiating trainer <%s>", cfg.trainer._target_)
        trainer = instantiate(
            cfg.trainer,
            default_root_dir=str(run_dir),
            callbacks=[record, *group_nodes(cfg, "callbacks", hydra_cfg)],
            logger=group_nodes(cfg, "logger", hydra_cfg, purge_step=resume_step(cfg.get("ckpt_path"))),
            plugins=[AtomicCheckpointIO()],
        )
        trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None  # none under fast_dev_run
        trainer.test(task, datamodule=datamodule, ckpt_path=best, weights_only=True)
    accuracy = record.metrics.get("test/acc")
    if trainer.is_global_zero and accuracy is not None:  # none where testing was skipped
        log.info("test accuracy: %.4f (%s; fit took %.0f s)", accuracy, best or "last weights", record.fit_seconds)
    return record.metrics


def run_seed(cfg: DictConfig, run_dir: Path) -> int:
    """`seed=` if given; else the seed of the checkpoint being continued; else one derived from the
    run folder's path. Every process of a run (Lightning's DDP ranks, srun's tasks on each node)
    shares that folder, so all compute the same seed without talking to each other."""
    if cfg.get("seed") is not None:
        return int(cfg.seed)
    if cfg.get("ckpt_path"):
        import torch

        recorded = torch.load(cfg.ckpt_path, map_location="cpu", mmap=True, weights_only=True).get("seed")
        if recorded is not None:
            return int(recorded)
    return int.from_bytes(hashlib.sha256(str(run_dir.resolve()).encode()).digest()[:4], "big") % 2**31


def resume_step(ckpt_path: str | None) -> int | None:
    """The global step of the checkpoint a run continues from: loggers drop what came after it."""
    if not ckpt_path:
        return None
    import torch

    return torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=True)["global_step"]


def group_nodes(cfg: DictConfig, group: str, hydra_cfg: DictConfig, **settings: object) -> list:
    """The objects a `callbacks` or `logger` option describes, one per node, given `settings` where
    a node has those keys. With no option chosen, the group's `default` option: config.yaml cannot
    list it, or `--cfg job` would not print the spec's config."""
    from hydra import compose
    from hydra.utils import instantiate

    node = cfg.get(group)
    if hydra_cfg.runtime.choices.get(group) is None:
        if node:  # `+callbacks.x.y=...` with no option chosen would be dropped without a word
            raise ConfigError(f"{group}: settings given but no {group} option chosen; fix: add {group}=default")
        node = compose(config_name=hydra_cfg.job.config_name, overrides=[f"{group}=default"])[group]
    return [instantiate(child, **{k: v for k, v in settings.items() if k in child}) for child in (node or {}).values()]


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg).get("objective")
    except SystemExit as stop:  # how Lightning leaves after Ctrl-C (130) or SIGTERM (143)
        raise SystemExit(interrupt_exit_code(stop)) from stop
    except Exception as err:
        exit_on_error(err)
        raise


if __name__ == "__main__":
    try:
        # Before Hydra parses the command line: after this, nothing process-wide changes.
        sys.argv[1:] = command_line(sys.argv[1:])
    except Exception as err:
        exit_on_error(err)
        raise
    main()
