from functools import partial

import pytest
import torch
from conftest import compose_config, quiet_trainer, train_config
from hydra.utils import execution_whitelist, instantiate
from omegaconf import open_dict
from torch import nn
from torch.optim.swa_utils import AveragedModel

from mnist_extras.averaging import moving_average_step
from train import train

RECIPES = ["mnist_99", "mnist_995", "mnist_997"]


@pytest.mark.parametrize("experiment", RECIPES)
def test_experiments_compose_onto_the_spec_config(experiment):
    cfg = compose_config(f"+experiment={experiment}", "trainer=cpu")
    assert cfg.task.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.task.scheduler._target_ == "torch.optim.lr_scheduler.OneCycleLR"
    assert cfg.task.model.backbone._target_ == "backbones.ResNet18"
    assert cfg.task.model.backbone.pretrained is False
    assert cfg.trainer.accelerator == "cpu"  # the experiment leaves the hardware to the user
    assert list(cfg.logger) == list(compose_config("logger=default").logger)
    default = list(compose_config("callbacks=default").callbacks)
    assert list(cfg.callbacks)[: len(default)] == default
    assert "centre_taps" in cfg.callbacks
    instantiate(cfg.task)


def test_each_recipe_names_its_own_extras_in_its_config():
    mnist_99, mnist_995, mnist_997 = (compose_config(f"+experiment={name}").callbacks for name in RECIPES)
    assert list(mnist_99) == list(compose_config("callbacks=speed").callbacks)
    assert "measured_speed" not in mnist_995
    assert {"moving_average", "centre_taps", "measured_speed"} <= set(mnist_997)
    assert list(mnist_997).index("centre_taps") < list(mnist_997).index("measured_speed")
    assert (mnist_997.model_checkpoint.monitor, mnist_997.model_checkpoint.mode) == ("val/loss", "min")
    augmented = compose_config("+experiment=mnist_997").data_module
    assert augmented._target_ == "mnist_extras.augment.AugmentedMNISTDataModule"
    assert (augmented.augment, augmented.elastic) == (True, 1.0)
    assert compose_config("+experiment=mnist_99").data_module._target_ == "data_modules.MNISTDataModule"


def test_a_backbone_chosen_on_the_command_line_replaces_the_recipes_whole():
    backbone = compose_config("+experiment=mnist_99", "task.model.backbone=resnet34").task.model.backbone
    assert dict(backbone) == dict(compose_config("task.model.backbone=resnet34").task.model.backbone)


class SmallCNN(nn.Module):
    """A copier's first backbone: two convolutions, no ResNet settings (no stem, no pretrained)."""

    out_features = 512

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(2 * channels, self.out_features),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_a_two_layer_cnn_backbone_trains_with_the_mnist_99_recipe(tmp_path, mnist_dir, monkeypatch):
    options = tmp_path / "configs" / "task" / "model" / "backbone"
    options.mkdir(parents=True)
    (options / "small_cnn.yaml").write_text(f"_target_: {__name__}.SmallCNN\nchannels: 8\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # mnist_99 measures its speed settings
    cfg = train_config(
        tmp_path / "run",
        mnist_dir,
        f"hydra.searchpath=[file://{tmp_path / 'configs'}]",
        "+experiment=mnist_99",
        "task.model.backbone=small_cnn",
        "trainer=cpu",
        "data_module.batch_size=32",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.log_every_n_steps=1",
        "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=2",
    )
    assert dict(cfg.task.model.backbone) == {"_target_": f"{__name__}.SmallCNN", "channels": 8}
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = False
    with execution_whitelist(f"{__name__}.SmallCNN"):  # a part outside the project's modules, as train.py's TARGETS
        metrics = train(cfg)
    assert 0 <= metrics["test/acc"] <= 1


def test_one_cycle_schedule_gets_the_trainers_step_count(mnist_dir):
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
        torch.testing.assert_close(compiled(images), plain(images), rtol=1e-4, atol=1e-5)
