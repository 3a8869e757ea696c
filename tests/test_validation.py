"""A config that cannot work stops before any work with one line: the key, the value, what is allowed, the fix."""

from pathlib import Path

import pytest
from conftest import TINY_RUN, compose_config, run_train, run_train_watching_imports

from mnist_extras.errors import ConfigError
from mnist_extras.checks import build_trainer, check_data_dir, check_processes, check_run, check_writable

# One bad override each, and the one line it must produce. The first group fails the typed schemas
# (no torch imported); the second needs the libraries (imports, Lightning's own checks).
SCHEMA = {
    "task.optimizer.lr=-1": "task.optimizer.lr=-1: a finite number > 0; fix: task.optimizer.lr=5e-05",
    "task.optimizer.lr=nan": "task.optimizer.lr=nan: a finite number > 0; fix: task.optimizer.lr=5e-05",
    "task.optimizer.lr=abc": "task.optimizer.lr=abc: a finite number > 0; fix: task.optimizer.lr=5e-05",
    "task.optimizer.weight_decay=-0.1": (
        "task.optimizer.weight_decay=-0.1: a finite number >= 0; fix: task.optimizer.weight_decay=0.2"
    ),
    "data_module.batch_size=0": "data_module.batch_size=0: a whole number >= 1; fix: data_module.batch_size=64",
    "data_module.batch_size=6.5": "data_module.batch_size=6.5: a whole number >= 1; fix: data_module.batch_size=64",
    "data_module.num_workers=-2": "data_module.num_workers=-2: a whole number >= 0; fix: data_module.num_workers=0",
    "data_module.pin_memory=maybe": "data_module.pin_memory=maybe: true or false; fix: data_module.pin_memory=false",
    "++seed=-1": "seed=-1: a whole number in [0, 4294967295], or null; fix: seed=42",
    "task.optimizer._partial_=false": (
        "task.optimizer._partial_=false: true, since the task passes the model's parameters to the optimizer; "
        "fix: task.optimizer._partial_=true"
    ),
    "task.model.adapter.out_features=5": (
        "task.model.adapter.out_features=5: 10, one logit per digit; fix: task.model.adapter.out_features=10"
    ),
    "task.model.adapter.in_features=2048": (
        "task.model.adapter.in_features=2048: 512, the width every backbone gives; "
        "fix: task.model.adapter.in_features=512"
    ),
    "+task.model.backbone.stem=round": (
        "task.model.backbone.stem=round: imagenet, digits or digits14; fix: task.model.backbone.stem=imagenet"
    ),
    "task.speed=fast": "task.speed=fast: auto, or null for the trainer's settings as given; fix: task.speed=auto",
    "+data_module.on_device=maybe": (
        "data_module.on_device=maybe: true, false, or null (on when the run has a GPU); fix: data_module.on_device=null"
    ),
    "+data_module.elastic=-1": (
        "data_module.elastic=-1: a number of pixels >= 0 (used with augment=true); fix: data_module.elastic=0.0"
    ),
    # Config-group options are checked before Hydra composes anything.
    "task.model.backbone=resnet99": (
        "task.model.backbone=resnet99: one of resnet18, resnet34, resnet50; fix: task.model.backbone=resnet18"
    ),
    "task/model/backbone=resnet18,resnet99": (
        "task/model/backbone=resnet18,resnet99: one of resnet18, resnet34, resnet50; fix: task/model/backbone=resnet18"
    ),
    "trainer=tpu": "trainer=tpu: one of cpu, ddp, ddp_cpu, gpu; fix: trainer=cpu",
}
LIBRARY = {
    "trainer.max_epochs=abc": "trainer.max_epochs=abc: a whole number or null; fix: trainer.max_epochs=null",
    "+trainer.max_epoch=3": (
        "trainer.max_epoch=3: not an argument of pytorch_lightning.Trainer; fix: trainer.max_epochs=3"
    ),
    "+trainer.limit_train_batches=1.5": (
        "trainer: You have passed invalid value 1.5 for limit_train_batches, it has to be in [0.0, 1.0] or an int.; "
        "fix: change the trainer setting it names (python train.py --cfg job --package trainer shows them)"
    ),
    "trainer.accelerator=npu": "trainer: You selected an invalid accelerator name: `accelerator='npu'`.",
    "++trainer.strategy=ddp_spawn": (
        "trainer.strategy=ddp_spawn: spawned processes hand nothing back to the run (run.json, metrics.csv and the "
        "learning curve would stay empty); fix: trainer=ddp_cpu on CPUs, trainer=ddp on GPUs"
    ),
    "task.model.backbone._target_=backbones.ResNet99": (
        "task.model.backbone._target_=backbones.ResNet99: backbones has no ResNet99; "
        "fix: task.model.backbone._target_=backbones.ResNet50"
    ),
    "task.optimizer._target_=torch.optim.Adamm": (
        "task.optimizer._target_=torch.optim.Adamm: torch.optim has no Adamm; "
        "fix: task.optimizer._target_=torch.optim.Adam"
    ),
    "data_module.data_dir=/proc/version/mnist": (
        "data_module.data_dir=/proc/version/mnist: a folder this process can write (Not a directory); "
        "fix: data_module.data_dir=./data/mnist"
    ),
}


@pytest.mark.parametrize("override", list(SCHEMA))
def test_a_bad_value_stops_in_one_line_before_torch_is_imported_and_leaves_no_folder(override, tmp_path):
    run_dir = tmp_path / "run"
    result = run_train_watching_imports("trainer=cpu", override, f"hydra.run.dir={run_dir}")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"error: {SCHEMA[override]}"]
    assert "HEAVY []" in result.stdout
    assert not run_dir.exists()


@pytest.mark.parametrize("override", list(LIBRARY))
def test_what_the_libraries_refuse_stops_in_one_line_and_leaves_no_folder(override, tmp_path):
    run_dir = tmp_path / "run"
    result = run_train("trainer=cpu", override, f"hydra.run.dir={run_dir}")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"error: {LIBRARY[override]}")
    assert "Instantiating" not in result.stdout
    assert not run_dir.exists()


@pytest.mark.parametrize("override", ["task.optimizer.lr=-1", "task.model.backbone=resnet99"])
def test_hydra_full_error_still_shows_the_traceback(override, tmp_path):
    result = run_train("trainer=cpu", override, f"hydra.run.dir={tmp_path}", env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1
    assert "Traceback" in result.stderr


@pytest.mark.parametrize(
    "overrides",
    [
        TINY_RUN,
        ["trainer=cpu", "task.model.backbone=resnet50", "task.model.backbone.pretrained=false"],
        [
            "trainer=cpu",
            "+trainer.fast_dev_run=true",
            "+trainer.precision=bf16-mixed",
            "+trainer.gradient_clip_val=1.0",
        ],
        ["trainer=cpu", "+trainer.limit_train_batches=0.25", "trainer.devices=auto", "trainer.max_epochs=-1"],
        ["trainer=cpu", "++seed=7", "task.optimizer._target_=torch.optim.SGD", "~task.optimizer.weight_decay"],
        ["trainer=ddp_cpu"],
        ["+experiment=mnist_99", "trainer=cpu"],
        ["+experiment=mnist_997", "trainer=cpu"],
    ],
)
def test_good_configs_pass(overrides, mnist_dir):
    check_run(compose_config(*overrides, f"data_module.data_dir={mnist_dir}"))


def test_a_read_only_copy_of_mnist_is_accepted(mnist_dir):
    check_data_dir(compose_config(f"data_module.data_dir={mnist_dir}"))


def test_a_folder_that_only_looks_writable_is_tried_for_real(tmp_path):
    """As root, os.access says yes to /proc; creating the folder and a file in it tells the truth."""
    with pytest.raises(ConfigError, match=r"hydra.run.dir=/proc/nope: a folder this process can write"):
        check_writable("hydra.run.dir", Path("/proc/nope"), "hydra.run.dir=PATH")
    with pytest.raises(ConfigError, match=r"data_module.data_dir=/proc/nope"):
        check_data_dir(compose_config("data_module.data_dir=/proc/nope"))
    check_writable("hydra.run.dir", tmp_path / "new" / "run", "hydra.run.dir=PATH")
    assert not (tmp_path / "new").exists()  # the probe leaves nothing behind


def test_a_run_folder_that_cannot_be_written_stops_the_run(tmp_path):
    result = run_train("trainer=cpu", "task.model.backbone.pretrained=false", "hydra.run.dir=/proc/nope")
    assert result.returncode == 2
    assert result.stderr.startswith("error: hydra.run.dir=/proc/nope: a folder this process can write")


def test_processes_that_cannot_report_back_are_refused_before_any_work():
    cfg = compose_config("trainer=ddp_cpu")
    check_processes(build_trainer(cfg), "ddp_cpu")  # a run of its own: Lightning starts rank 1 by re-running it
    with pytest.raises(ConfigError, match=r"hydra.launcher=JoblibLauncher with 2 processes per job"):
        check_processes(
            build_trainer(cfg), "ddp_cpu", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
        )
