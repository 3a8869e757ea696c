import os

import pytest
from conftest import TINY_RUN, compose_config, run_train, run_train_watching_imports

from train import CONFIG_DIR, PROJECT_DIR
from validation import ConfigError, check_group_choices, validate

# One bad override each, and the one line it must produce.
BAD = {
    "task.optimizer.lr=-1": "task.optimizer.lr=-1: a finite number > 0; fix: task.optimizer.lr=5e-05",
    "task.optimizer.lr=nan": "task.optimizer.lr=nan: a finite number > 0; fix: task.optimizer.lr=5e-05",
    "task.optimizer.weight_decay=-0.1": (
        "task.optimizer.weight_decay=-0.1: a finite number >= 0; fix: task.optimizer.weight_decay=0.2"
    ),
    "data_module.batch_size=0": "data_module.batch_size=0: a whole number >= 1; fix: data_module.batch_size=64",
    "data_module.batch_size=6.5": "data_module.batch_size=6.5: a whole number >= 1; fix: data_module.batch_size=64",
    "data_module.num_workers=-2": (
        "data_module.num_workers=-2: a whole number >= 0 (0 loads batches in the main process); "
        "fix: data_module.num_workers=0"
    ),
    "data_module.pin_memory=yes": "data_module.pin_memory=yes: true or false; fix: data_module.pin_memory=false",
    "trainer.max_epochs=abc": (
        "trainer.max_epochs=abc: a whole number >= 1, or -1 for no limit; fix: trainer.max_epochs=10"
    ),
    "trainer.devices=0": (
        "trainer.devices=0: a number of devices >= 1, -1 for all, a list of device ids such as [0,1], or auto; "
        "fix: trainer.devices=1"
    ),
    "trainer.accelerator=npu": (
        "trainer.accelerator=npu: one of cpu, gpu, cuda, mps, tpu, auto; fix: trainer.accelerator=cpu"
    ),
    "+trainer.limit_train_batches=1.5": (
        "trainer.limit_train_batches=1.5: a fraction of the batches in [0.0, 1.0] or a whole number of batches >= 0; "
        "fix: trainer.limit_train_batches=1.0"
    ),
    "+trainer.precision=bf17": (
        "trainer.precision=bf17: one of 32-true, 16-mixed, bf16-mixed, 16-true, bf16-true, 64-true, 16, 32, 64, "
        "bf16; fix: trainer.precision=32-true"
    ),
    "++seed=-1": "seed=-1: a whole number in [0, 4294967295], or null; fix: seed=42",
    "task.optimizer._partial_=false": (
        "task.optimizer._partial_=false: true, since the task passes the model's parameters to the optimizer; "
        "fix: task.optimizer._partial_=true"
    ),
    "task.model.adapter.out_features=5": (
        "task.model.adapter.out_features=5: 10, one logit per digit; fix: task.model.adapter.out_features=10"
    ),
    "task.model.adapter.in_features=2048": (
        "task.model.adapter.in_features=2048 but backbones.ResNet18 gives 512 features: the adapter must take the "
        "backbone's width; fix: task.model.adapter.in_features=512"
    ),
    "task.model.backbone._target_=backbones.ResNet99": (
        "task.model.backbone._target_=backbones.ResNet99: backbones.py defines ResNet18, ResNet34, ResNet50, "
        "ResNetBackbone; fix: task.model.backbone._target_=backbones.ResNet50"
    ),
    "task.optimizer._target_=torch.optim.Adamm": (
        "task.optimizer._target_=torch.optim.Adamm: torch.optim has no Adamm (close: Adam, RAdam, NAdam); "
        "fix: task.optimizer._target_=torch.optim.Adam"
    ),
    "task.loss_function._target_=losses.CrossEntropyLoss": (
        "task.loss_function._target_=losses.CrossEntropyLoss: there is no Python module named losses; "
        "fix: task.loss_function._target_=<existing name>"
    ),
    "data_module.data_dir=/proc/version/mnist": (
        "data_module.data_dir=/proc/version/mnist: a folder that holds MNIST or can be written "
        "(/proc/version is a file, not a folder); fix: data_module.data_dir=./data/mnist"
    ),
    # Config-group options are checked before Hydra composes anything.
    "task.model.backbone=resnet99": (
        "task.model.backbone=resnet99: task.model.backbone is one of resnet18, resnet34, resnet50; "
        "fix: task.model.backbone=resnet18"
    ),
    "task/model/backbone=resnet18,resnet99": (
        "task/model/backbone=resnet18,resnet99: task/model/backbone is one of resnet18, resnet34, resnet50; "
        "fix: task/model/backbone=resnet18"
    ),
    "trainer=tpu": "trainer=tpu: trainer is one of cpu, ddp, ddp_cpu, gpu; fix: trainer=cpu",
}


@pytest.mark.parametrize("override", list(BAD))
def test_bad_override_exits_2_with_one_line_before_any_work(override, tmp_path):
    run_dir = tmp_path / "run"
    result = run_train("trainer=cpu", override, f"hydra.run.dir={run_dir}")

    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"error: {BAD[override]}"]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (run_dir / "checkpoints").exists()
    assert "Instantiating" not in result.stdout + result.stderr


@pytest.mark.parametrize("override", ["task.optimizer.lr=-1", "task.model.backbone=resnet99"])
def test_hydra_full_error_still_shows_the_traceback(override):
    result = run_train("trainer=cpu", override, env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1
    assert "Traceback" in result.stderr


def test_a_bad_value_stops_before_torch_or_lightning_is_imported():
    result = run_train_watching_imports("trainer=cpu", "data_module.batch_size=0")
    assert result.returncode == 2, result.stderr
    assert "HEAVY []" in result.stdout


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        TINY_RUN,
        ["task.model.backbone=resnet50", "task.model.backbone.pretrained=false"],
        ["+trainer.fast_dev_run=true", "+trainer.precision=bf16-mixed", "+trainer.gradient_clip_val=1.0"],
        ["+trainer.limit_train_batches=0.25", "trainer.devices=auto", "trainer.max_epochs=-1"],
        ["+trainer.some_future_option=3", "++seed=7", "++ckpt_path=last"],
        ["task.optimizer._target_=torch.optim.SGD", "~task.optimizer.weight_decay", "task.optimizer.lr=1"],
        ["trainer.devices=[0,1]", "trainer=gpu"],
    ],
)
def test_good_configs_pass(overrides):
    validate(compose_config(*overrides), PROJECT_DIR)


def test_a_read_only_copy_of_mnist_is_accepted(mnist_dir):
    validate(compose_config(f"data_module.data_dir={mnist_dir}"), PROJECT_DIR)


def test_a_folder_that_cannot_be_created_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"is a file, not a folder"):
        validate(compose_config(f"data_module.data_dir={tmp_path / 'file' / 'mnist'}"), PROJECT_DIR)


def test_an_uncreatable_folder_with_mnist_missing_is_refused_for_other_users(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    cfg = compose_config(f"data_module.data_dir={locked / 'mnist'}")
    if os.access(locked, os.W_OK):
        pytest.skip("this user can write anywhere (root)")
    with pytest.raises(ConfigError, match=r"cannot be written, and MNIST is not there yet"):
        validate(cfg, PROJECT_DIR)


@pytest.mark.parametrize(
    "args",
    [
        ["task.model.backbone=resnet50"],
        ["-m", "task.model.backbone=resnet18,resnet34,resnet50"],
        ["task.model.backbone=glob(*)"],
        ["trainer=cpu", "hydra/launcher=basic", "task.model.backbone.pretrained=false", "~task.model.head"],
    ],
)
def test_group_choices_that_exist_pass(args):
    check_group_choices(args, CONFIG_DIR)
