"""Checks on the composed config that run before anything heavy is imported or built."""

from omegaconf import DictConfig


class ConfigError(ValueError):
    """A value that cannot work. The message names the key, the value, what is allowed and the fix."""


def check_accelerator(trainer: DictConfig) -> None:
    """Stop at once when the trainer asks for a GPU that PyTorch cannot see."""
    if trainer.get("accelerator") not in ("gpu", "cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={trainer.accelerator} but PyTorch sees no CUDA GPU here; "
            "train on the CPU with trainer=cpu"
        )
