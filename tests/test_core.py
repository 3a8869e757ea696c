"""The spec's project stands alone: a copy without mnist_extras/, hydra_plugins/ and the config
options that name them still prints the spec's config, trains, tests and sweeps."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_DIR
from omegaconf import OmegaConf

EXPECTED = (Path(__file__).parent / "expected_config.yaml").read_text()
EXTRAS = ("mnist_extras", "hydra_plugins")
TINY = ["trainer=cpu", "task.model.backbone.pretrained=false", "data_module.num_workers=0"]


@pytest.fixture(scope="module")
def core_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("core")
    for name in ("train.py", "tasks.py", "models.py", "backbones.py", "adapters.py", "heads.py",
                 "loss_functions.py", "data_modules.py"):
        shutil.copy(PROJECT_DIR / name, copy / name)
    shutil.copytree(PROJECT_DIR / "configs", copy / "configs")
    for path in list((copy / "configs").rglob("*.yaml")):
        if any(f"{name}." in path.read_text() for name in EXTRAS):
            path.unlink()
    config = copy / "configs" / "config.yaml"
    config.write_text("".join(line for line in config.read_text().splitlines(True) if "hydra/callbacks" not in line))
    return copy


def run_core(copy: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=copy, capture_output=True, text=True, timeout=600)


def test_the_copy_holds_no_extras(core_copy):
    names = {path.name for path in core_copy.iterdir()}
    assert not names & set(EXTRAS)
    assert not any(name in path.read_text() for path in core_copy.rglob("*.*") for name in EXTRAS)
    assert (core_copy / "configs" / "debug" / "fdr.yaml").is_file()  # the debug presets are core


def test_the_core_prints_the_spec_config(core_copy):
    result = run_core(core_copy, "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert result.stdout == EXPECTED


def test_the_core_trains_and_tests(core_copy, mnist_dir):
    result = run_core(core_copy, "debug=fdr", *TINY, f"data_module.data_dir={mnist_dir}", "hydra.run.dir=out")
    assert result.returncode == 0, result.stderr
    assert "test accuracy: " in result.stdout + result.stderr


def test_the_core_runs_the_spec_sweep(core_copy, mnist_dir):
    backbones = "task.model.backbone=resnet18,resnet34,resnet50"
    args = ["-m", backbones, "debug=fdr", *TINY, f"data_module.data_dir={mnist_dir}", "hydra.sweep.dir=sweep"]
    result = run_core(core_copy, *args)
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).count("test accuracy: ") == 3
    assert (core_copy / "sweep" / "multirun.yaml").is_file()  # as Hydra writes a sweep
    for num in range(3):  # Hydra's own launcher: each job knows its number
        job = OmegaConf.load(core_copy / "sweep" / str(num) / ".hydra" / "hydra.yaml").hydra.job
        assert (job.num, str(job.id)) == (num, str(num))
