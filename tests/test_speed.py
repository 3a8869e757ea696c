import json
import logging

import pytest
import torch
from conftest import TINY_RUN, compose_config, quiet_trainer
from hydra.utils import instantiate
from test_train import train_config

from mnist_extras import speed
from mnist_extras.speed import PLAIN, MeasuredSpeed, Setting, candidate_settings, trains
from train import train


def tiny_fit(task, mnist_dir, **trainer_args):
    cfg = compose_config("data_module.batch_size=8", "data_module.num_workers=0")
    datamodule = instantiate(cfg.data_module, data_dir=str(mnist_dir))
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, **trainer_args)
    trainer.fit(task, datamodule=datamodule)
    return trainer


def plain_task():
    return instantiate(compose_config("task.model.backbone.pretrained=false").task)


def test_callbacks_speed_adds_the_measurement_and_the_centre_taps_to_the_default_callbacks():
    chosen = compose_config("callbacks=speed").callbacks
    default = compose_config("callbacks=default").callbacks
    assert list(chosen) == [*default, "centre_taps", "measured_speed"]  # the taps are in before the measurement
    assert instantiate(chosen.measured_speed).__class__ is MeasuredSpeed


def test_auto_applies_its_choice_caches_it_and_reads_it_back(mnist_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    caplog.set_level(logging.INFO, logger="mnist_extras.speed")
    task = plain_task()
    trainer = tiny_fit(task, mnist_dir, callbacks=[MeasuredSpeed(steps=1)])

    (entry,) = json.loads((tmp_path / "mnist-hydra-lightning" / "speed.json").read_text()).values()
    choice = Setting(**entry["choice"])
    assert choice in candidate_settings(PLAIN, torch.device("cpu"))
    assert trainer.precision == choice.precision
    weight = task.model.backbone.net.layer1[0].conv1.weight  # 64 input channels: the layouts differ
    assert weight.is_contiguous(memory_format=torch.channels_last) == choice.channels_last
    assert "images/s over 1 steps of 8" in entry["why"]
    assert any(r.message.startswith(f"speed: {choice}, measured in") for r in caplog.records)

    caplog.clear()
    monkeypatch.setattr(speed, "measure", lambda *args: pytest.fail("measured again despite the cache"))
    tiny_fit(plain_task(), mnist_dir, callbacks=[MeasuredSpeed(steps=1)])
    assert any(f"speed: {choice}, measured on this machine" in r.message for r in caplog.records)


def test_the_fastest_setting_that_trains_correctly_wins(mnist_dir, tmp_path, monkeypatch):
    bf16, fast_wrong = Setting("bf16-mixed"), Setting("bf16-mixed", channels_last=True)
    speeds = {Setting(): 100.0, Setting(PLAIN, True): 110.0, bf16: 150.0, fast_wrong: 300.0}
    losses = {Setting(): (2.3, 1.0), Setting(PLAIN, True): (2.3, 1.2), bf16: (2.31, 1.1)}
    losses[fast_wrong] = (2.3, float("nan"))
    monkeypatch.setattr(speed, "measure", lambda *args: (speeds, losses))
    callback = MeasuredSpeed(cache=tmp_path / "speed.json")
    trainer = tiny_fit(plain_task(), mnist_dir, callbacks=[callback])
    assert trainer.precision == "bf16-mixed"
    (entry,) = json.loads((tmp_path / "speed.json").read_text()).values()
    assert entry["choice"] == {"precision": "bf16-mixed", "channels_last": False}
    assert "1.50x 32-true" in entry["why"]
    assert "bf16-mixed + channels_last dropped, its losses 2.300 -> nan" in entry["why"]


def test_when_no_setting_learns_the_settings_given_are_kept(mnist_dir, tmp_path, monkeypatch):
    candidates = candidate_settings(PLAIN, torch.device("cpu"))
    speeds = {c: 100.0 + i for i, c in enumerate(candidates)}
    monkeypatch.setattr(speed, "measure", lambda *args: (speeds, {c: (2.3, 2.4) for c in candidates}))
    trainer = tiny_fit(plain_task(), mnist_dir, callbacks=[MeasuredSpeed(cache=tmp_path / "speed.json")])
    assert trainer.precision == PLAIN
    (entry,) = json.loads((tmp_path / "speed.json").read_text()).values()
    assert entry["choice"] == {"precision": PLAIN, "channels_last": False}


def test_a_precision_given_to_the_trainer_is_kept():
    assert candidate_settings("bf16-mixed", torch.device("cpu")) == [
        Setting("bf16-mixed", False),
        Setting("bf16-mixed", True),
    ]
    assert {s.precision for s in candidate_settings(PLAIN, torch.device("cpu"))} == {PLAIN, "bf16-mixed"}


def test_training_correctly_means_32_bits_first_loss_then_a_lower_finite_one():
    reference = (2.3, 0.7)
    assert trains((2.31, 0.9), reference)  # later losses may drift apart: only the first is compared
    assert not trains((3.0, 0.9), reference)  # computes something else
    assert not trains((2.3, 2.4), reference)  # does not learn
    assert not trains((2.3, float("nan")), reference)
    assert not trains((float("inf"), 0.5), reference)


# The same folder: the run continues there.
@pytest.mark.filterwarnings("ignore:Experiment logs directory", "ignore:Checkpoint directory")
def test_a_measured_speed_run_resumes_from_its_checkpoint(mnist_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="mnist_extras.speed")
    run_dir = tmp_path / "run"
    args = [*TINY_RUN, "trainer.log_every_n_steps=1", "data_module.batch_size=16", "callbacks=speed", "+seed=1"]
    args.append("callbacks.measured_speed.steps=1")
    train(train_config(run_dir, mnist_dir, *args))
    assert "measured in" in caplog.text
    caplog.clear()
    last = run_dir / "checkpoints" / "last.ckpt"
    resumed = train(train_config(run_dir, mnist_dir, *args, "trainer.max_epochs=2", f"+ckpt_path={last}"))
    assert "measured on this machine" in caplog.text  # the second start reads the cache
    assert resumed["test/acc"] > 0
