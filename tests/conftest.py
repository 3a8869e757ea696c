import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import execution_whitelist
from omegaconf import DictConfig, open_dict

from mnist_extras.mnist_files import prepare_mnist
from train import CONFIG_DIR, TARGETS, as_group_choice

PROJECT_DIR = CONFIG_DIR.parent

# Enough of every stage to run it for real, small enough for a 2-core CPU.
TINY_RUN = [
    "trainer=cpu",
    "task.model.backbone.pretrained=false",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "+trainer.enable_model_summary=false",
    "data_module.num_workers=0",
]
# Any download fails at once, as it would on a machine without internet.
OFFLINE = {name: "http://127.0.0.1:9" for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real MNIST, prepared once for the whole session."""
    data_dir = tmp_path_factory.mktemp("mnist")
    prepare_mnist(data_dir / "MNIST" / "raw")
    return data_dir


def compose_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR)):
        return compose(config_name="config", overrides=[as_group_choice(arg) for arg in overrides])


def quiet_trainer(**settings: object) -> pl.Trainer:
    """A CPU trainer that writes and prints nothing: no logger, checkpoints, progress bar or summary."""
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **settings,
    )


def run_train(*args: str, env: dict[str, str] | None = None, script: str = "train.py") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *args],
        cwd=PROJECT_DIR,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=900,
    )


def run_here(script: str, *args: str, monkeypatch: pytest.MonkeyPatch) -> int | str | None:
    """`python <script> <args>`, its `__main__` run in this process: its exit code. For refusals and exit
    codes, where a process of its own would spend seconds importing torch to print one line."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # Hydra's logging setup would outlive the test
    try:
        runpy.run_path(str(PROJECT_DIR / script), run_name="__main__")
    except SystemExit as stop:
        return stop.code
    finally:
        root.handlers[:], root.level = handlers, level
    return 0


def run_train_watching_imports(*args: str) -> subprocess.CompletedProcess:
    """train.py in a subprocess that prints, as it exits, which of torch, Lightning and torchvision
    it imported: `HEAVY []` when none."""
    code = (
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print('HEAVY', sorted(m for m in ('torch', 'pytorch_lightning', 'torchvision')"
        " if m in sys.modules)))\n"
        f"sys.argv = ['train.py', *{list(args)!r}]\n"
        "runpy.run_path('train.py', run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=PROJECT_DIR, capture_output=True, text=True)


# About 20 s on 2 cores: enough training for a model that classifies most digits right.
LEARNING_RUN = [
    "trainer=cpu",
    "task.model.backbone.pretrained=false",
    "task.optimizer=adamw",
    "task.optimizer.lr=0.002",
    "data_module.batch_size=64",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=60",
    "+trainer.limit_val_batches=10",
    "+trainer.limit_test_batches=10",
    "+trainer.enable_model_summary=false",
    "data_module.num_workers=0",
    "+seed=0",
]


def train_config(run_dir: Path, data_dir: Path, *overrides: str) -> DictConfig:
    """The config `python train.py <overrides>` would run, with Hydra's runtime config set as
    @hydra.main sets it, so `${hydra:runtime.output_dir}` resolves to `run_dir`."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR)):
        cfg = compose("config", overrides=[as_group_choice(arg) for arg in overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
        cfg.data_module.data_dir = str(data_dir)
        cfg.trainer.accelerator = "cpu"
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture(scope="session")
def learned(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> tuple[Path, DictConfig, dict]:
    """A model trained on real digits for about 20 s, in this process, with no callbacks or logger
    option: its run folder, config and metrics."""
    from train import train

    run_dir = tmp_path_factory.mktemp("learned")
    cfg = train_config(run_dir, mnist_dir, *LEARNING_RUN)
    return run_dir, cfg, train(cfg)


@pytest.fixture(scope="session", autouse=True)
def targets_a_config_may_name():
    """Configs built in a test name what train.py lets them name (Hydra's execution whitelist)."""
    with execution_whitelist(TARGETS):
        yield


@pytest.fixture(scope="session", autouse=True)
def nothing_written_into_the_project():
    """Tests write under their temporary folders only: no outputs/, multirun/ or data/ left here."""
    before = set(PROJECT_DIR.iterdir())
    yield
    new = {path.name for path in set(PROJECT_DIR.iterdir()) - before} - {".pytest_cache", "__pycache__"}
    assert not new, f"the tests left {sorted(new)} in {PROJECT_DIR}"
