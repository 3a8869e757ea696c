"""The smallest @hydra.main app over the same configs/: the floor for train.py's start-up."""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    pass


if __name__ == "__main__":
    main()
