from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_config, quiet_trainer
from hydra.utils import instantiate
from torch.optim.swa_utils import AveragedModel

from mnist_extras.checkpoints import moving_average_step
from data_modules import MNISTDataModule, random_warp


@pytest.mark.parametrize("experiment", ["mnist_99", "mnist_995", "mnist_997"])
def test_experiments_compose_onto_the_spec_config(experiment):
    cfg = compose_config(f"+experiment={experiment}", "trainer=cpu")
    assert cfg.task.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.task.scheduler._target_ == "torch.optim.lr_scheduler.OneCycleLR"
    assert cfg.task.model.backbone._target_ == "backbones.ResNet18"
    assert cfg.trainer.accelerator == "cpu"  # the experiment leaves the hardware to the user
    instantiate(cfg.task)


def test_one_cycle_schedule_gets_the_trainers_step_count(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # mnist_99 measures its speed settings
    cfg = compose_config("+experiment=mnist_99", "trainer=cpu", "data_module.batch_size=8")
    task = instantiate(cfg.task)
    datamodule = instantiate(cfg.data_module, data_dir=str(mnist_dir))
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(task, datamodule=datamodule)
    scheduler = trainer.lr_scheduler_configs[0]
    assert isinstance(scheduler.scheduler, torch.optim.lr_scheduler.OneCycleLR)
    assert scheduler.scheduler.total_steps == 6
    assert scheduler.interval == "step"
    assert scheduler.scheduler.last_epoch == 6  # stepped once a batch


def test_random_warp_moves_each_digit_and_keeps_the_border_black():
    torch.manual_seed(0)
    images = torch.zeros(8, 1, 28, 28)
    images[:, :, 10:18, 12:16] = 255.0
    moved = random_warp(images)
    assert moved.shape == images.shape
    assert not torch.equal(moved[0], moved[1])  # each image gets its own transform
    assert moved[:, :, 0, :].abs().max() == 0  # nothing bleeds in from outside
    assert moved.sum() == pytest.approx(images.sum(), rel=0.25)  # the digit stays in view


def test_elastic_warp_bends_each_digit_on_top_of_the_same_affine_move():
    images = torch.zeros(8, 1, 28, 28)
    images[:, :, 8:20, 12:16] = 255.0
    torch.manual_seed(0)
    moved = random_warp(images)
    torch.manual_seed(0)
    bent = random_warp(images, elastic=1.0)
    assert not torch.equal(moved, bent)
    assert (bent - moved).abs().amax(dim=(1, 2, 3)).min() > 0  # every digit is bent
    assert bent[:, :, 0, :].abs().max() == 0
    assert bent.sum().item() == pytest.approx(moved.sum().item(), rel=0.15)  # bent, not torn or smeared away


def test_the_moving_average_follows_recent_weights_from_its_first_epoch():
    layer = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.BatchNorm1d(1))
    averaged = AveragedModel(layer, multi_avg_fn=partial(moving_average_step, decay=0.99), use_buffers=True)
    for step in range(1, 108):  # one epoch of 55,000 digits at batch 512; the weight walks 1, 2, ..., 107
        with torch.no_grad():
            layer[0].weight.fill_(step)
        layer(torch.randn(4, 1))  # counts a batch in BatchNorm's num_batches_tracked
        averaged.update_parameters(layer)
    # A plain EMA at 0.99 would still hold a third of the first steps' weights here (about 42).
    assert 90 < averaged.module[0].weight.item() < 107
    assert averaged.module[1].num_batches_tracked.item() == 107  # counters are copied, not averaged


def test_augmentation_applies_to_training_batches_only(mnist_dir):
    datamodule = MNISTDataModule(data_dir=str(mnist_dir), augment=True)
    datamodule.setup()
    batch = (datamodule.test_set.images[:16], datamodule.test_set.labels[:16])
    trainer = pl.Trainer(accelerator="cpu", logger=False)
    datamodule.trainer = trainer
    trainer.state.stage = "validate"
    plain = datamodule.on_after_batch_transfer(batch, 0)[0]
    trainer.state.stage = "train"
    augmented = datamodule.on_after_batch_transfer(batch, 0)[0]
    assert not torch.equal(plain, augmented)
    assert not torch.equal(augmented, datamodule.on_after_batch_transfer(batch, 0)[0])  # fresh each time
    trainer.state.stage = "validate"
    assert torch.equal(plain, datamodule.on_after_batch_transfer(batch, 0)[0])


@pytest.mark.slow
def test_compile_switch_gives_the_plain_models_outputs_and_parameter_names():
    cfg = compose_config("task.model.backbone.pretrained=false", "+task.compile=true")
    torch.manual_seed(0)
    compiled = instantiate(cfg.task).eval()
    torch.manual_seed(0)
    plain = instantiate(compose_config("task.model.backbone.pretrained=false").task).eval()
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints load either way
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), plain(images), rtol=1e-4, atol=1e-4)
