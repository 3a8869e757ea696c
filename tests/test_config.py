import shutil
from pathlib import Path

import pytest
from conftest import compose_config, run_train, run_train_watching_imports
from hydra import compose, initialize_config_dir

from train import CONFIG_DIR, as_group_choice

EXPECTED = (Path(__file__).parent / "expected_config.yaml").read_text()


def test_cfg_job_prints_the_spec_config_and_nothing_else():
    result = run_train("--cfg", "job")
    assert result.returncode == 0
    assert result.stdout == EXPECTED
    assert result.stderr == ""


def test_printing_the_config_imports_neither_torch_nor_lightning():
    result = run_train_watching_imports("--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("task.model.backbone=resnet50", "task/model/backbone=resnet50"),
        ("task.model.backbone=resnet18,resnet34,resnet50", "task/model/backbone=resnet18,resnet34,resnet50"),
        ("task.optimizer=adam", "task/optimizer=adam"),
        ("+task.model.head=identity_head", "+task/model/head=identity_head"),
        ("task/model/backbone=resnet50", "task/model/backbone=resnet50"),
        ("task.model.backbone.pretrained=false", "task.model.backbone.pretrained=false"),
        ("task.optimizer.lr=0.001", "task.optimizer.lr=0.001"),
        ("data_module.batch_size=128", "data_module.batch_size=128"),
        ("trainer=cpu", "trainer=cpu"),
        ("hydra.run.dir=out", "hydra.run.dir=out"),
        ("task.optimizer={_target_: torch.optim.SGD, _partial_: true, lr: 0.1}", None),
        ("-m", "-m"),
    ],
)
def test_command_line_rewrites_only_config_group_choices(given, expected):
    expected = given if expected is None else expected  # a dict replaces the node: no group choice
    assert as_group_choice(given) == expected
    assert as_group_choice(expected) == expected  # a fixed point: DDP's processes re-run the command line


@pytest.mark.parametrize("override", ["task.model.backbone=resnet50", "task/model/backbone=resnet50"])
def test_both_spellings_select_the_backbone_option(override):
    cfg = compose_config(override)
    assert cfg.task.model.backbone._target_ == "backbones.ResNet50"
    assert cfg.task.model.backbone.pretrained is True


def test_value_overrides_stay_value_overrides():
    cfg = compose_config(
        "task.optimizer.lr=0.001", "data_module.batch_size=128", "task.model.backbone.pretrained=false"
    )
    assert cfg.task.optimizer.lr == 0.001
    assert cfg.data_module.batch_size == 128
    assert cfg.task.model.backbone == {"_target_": "backbones.ResNet18", "pretrained": False}


def test_dot_form_on_the_command_line():
    result = run_train("--cfg", "job", "task.model.backbone=resnet34")
    assert result.returncode == 0, result.stderr
    assert "_target_: backbones.ResNet34\n      pretrained: true\n" in result.stdout


@pytest.mark.parametrize(
    ("config_file", "package"),
    [("task/model/simple_model.yaml", "task.model"), ("task/loss_function/cross_entropy.yaml", "task.loss_function")],
)
def test_package_directives_are_read_by_hydra(tmp_path, config_file, package):
    """A directive below any other comment line is silently ignored; these must be in the header."""
    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    path = configs / config_file
    path.write_text(path.read_text().replace(f"# @package {package}", "# @package task.moved"))
    with initialize_config_dir(config_dir=str(configs)):
        cfg = compose(config_name="config")
    assert "moved" in cfg.task
    assert package.rsplit(".", 1)[1] not in cfg.task
