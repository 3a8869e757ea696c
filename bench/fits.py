"""What the training benchmarks share: a recipe composed from configs/, and a trainer that only trains."""

import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from train import CONFIG_DIR, as_group_choice


def recipe(*overrides: str) -> DictConfig:
    """The config `python train.py <overrides>` would run."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR)):
        return compose(config_name="config", overrides=[as_group_choice(o) for o in overrides])


def bare_trainer(**settings) -> pl.Trainer:
    """One device; no logger, checkpoints, progress bar or model summary to time along."""
    return pl.Trainer(
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **settings,
    )
