import json
import logging
import os
from dataclasses import asdict
from datetime import datetime

import pytest
import torch
from conftest import TINY_RUN, compose_config, quiet_trainer, train_config
from hydra.utils import instantiate

from mnist_extras import speed
from mnist_extras.speed import PLAIN, MeasuredSpeed, Setting, candidate_settings, noise, trains
from train import train

BF16, BF16_CL, PLAIN_CL = Setting("bf16-mixed"), Setting("bf16-mixed", True), Setting(PLAIN, True)


def tiny_fit(task, mnist_dir, **trainer_args):
    cfg = compose_config("data_module.batch_size=8", "data_module.num_workers=0")
    datamodule = instantiate(cfg.data_module, data_dir=str(mnist_dir))
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, **trainer_args)
    trainer.fit(task, datamodule=datamodule)
    return trainer


def plain_task():
    return instantiate(compose_config("task.model.backbone.pretrained=false").task)


@pytest.fixture
def load(monkeypatch):
    """Sets the machine's 1-minute load average: 0 (quiet) unless a test says otherwise."""
    average = [0.0]
    monkeypatch.setattr(os, "getloadavg", lambda: (average[0], 0.0, 0.0))
    return average


def steady(real_measure):
    """The real measurement (its losses) with the same seconds every round: timings that agree."""

    def measure(*args):
        times, losses = real_measure(*args)
        return {c: [0.1 + 0.01 * i] * len(t) for i, (c, t) in enumerate(times.items())}, losses

    return measure


def speed_lines(caplog):
    return [r.message for r in caplog.records if r.name == "mnist_extras.speed"]


def test_callbacks_speed_adds_the_measurement_and_the_centre_taps_to_the_default_callbacks():
    chosen = compose_config("callbacks=speed").callbacks
    default = compose_config("callbacks=default").callbacks
    assert list(chosen) == [*default, "centre_taps", "measured_speed"]  # the taps are in before the measurement
    assert instantiate(chosen.measured_speed).__class__ is MeasuredSpeed


def test_auto_applies_its_choice_caches_it_and_reads_it_back(mnist_dir, tmp_path, monkeypatch, caplog, load):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(speed, "measure", steady(speed.measure))
    caplog.set_level(logging.INFO, logger="mnist_extras.speed")
    task = plain_task()
    trainer = tiny_fit(task, mnist_dir, callbacks=[MeasuredSpeed(steps=2, warmup=1)])

    (entry,) = json.loads((tmp_path / "mnist-hydra-lightning" / "speed.json").read_text()).values()
    choice = Setting(**entry["choice"])
    assert choice in candidate_settings(PLAIN, torch.device("cpu"))
    assert trainer.precision == choice.precision
    weight = task.model.backbone.net.layer1[0].conv1.weight  # 64 input channels: the layouts differ
    assert weight.is_contiguous(memory_format=torch.channels_last) == choice.channels_last
    assert "images/s, 2 steps of 8) at load 0.0 on" in entry["why"]
    assert datetime.fromisoformat(entry["measured"]).tzinfo is not None
    assert (entry["load"], entry["cores"]) == (0, os.cpu_count())
    (line,) = speed_lines(caplog)  # one line: the choice, each candidate's images/s, the time it took
    assert line.startswith(f"speed: {choice}, {entry['why']}, measured in ")

    caplog.clear()
    monkeypatch.setattr(speed, "measure", lambda *args: pytest.fail("measured again despite the cache"))
    tiny_fit(plain_task(), mnist_dir, callbacks=[MeasuredSpeed(steps=2)])
    (line,) = speed_lines(caplog)
    assert line.startswith(f"speed: {choice}, {entry['why']}, cached 0.0 h ago in ")


def test_noisy_timings_are_not_cached_and_the_settings_given_are_kept(mnist_dir, tmp_path, monkeypatch, caplog, load):
    # bf16 is fastest in the first two rounds, 32-bit in the last two: a burst of other work, not the settings.
    times = {Setting(): [1.0] * 4, PLAIN_CL: [1.1] * 4, BF16: [0.5, 0.5, 2.0, 2.0], BF16_CL: [3.0] * 4}
    monkeypatch.setattr(speed, "measure", lambda *args: (times, {c: (2.3, 2.0) for c in times}))
    caplog.set_level(logging.INFO, logger="mnist_extras.speed")
    task = plain_task()
    trainer = tiny_fit(task, mnist_dir, callbacks=[MeasuredSpeed(cache=tmp_path / "speed.json")])
    assert not (tmp_path / "speed.json").exists()
    assert trainer.precision == PLAIN
    assert task.model.backbone.net.layer1[0].conv1.weight.is_contiguous()
    (line,) = speed_lines(caplog)
    assert line.startswith(
        "speed: 32-true (the default; not cached, timings disagree: bf16-mixed took 0.50 s a step in the first half"
    )


def test_timings_whose_halves_differ_by_more_than_15_percent_are_noise_and_a_close_race_is_not():
    plain, fast = Setting(), BF16
    assert noise({plain: [1.0] * 4, fast: [0.8] * 4}, [fast, plain]) == ""
    assert noise({plain: [1.0] * 4, fast: [0.5, 0.5, 2, 2]}, [fast, plain]) == (
        "bf16-mixed took 0.50 s a step in the first half of the rounds, 2.00 s in the second"
    )
    assert noise({plain: [1.0] * 4, fast: [0.95, 0.95, 0.8, 0.8]}, [fast, plain]).startswith("bf16-mixed took 0.95")
    assert noise({plain: [1.0, 1.0, 1.2, 1.2], fast: [0.8] * 4}, [fast, plain]).startswith("32-true took 1.00")
    # Within 15% each, though the halves favour different settings: either is as fast as the other.
    assert noise({plain: [1.0, 1.0, 1.1, 1.1], fast: [1.05, 1.05, 1.0, 1.0]}, [fast, plain]) == ""


@pytest.mark.parametrize(
    ("cached_load", "load_now", "measures"),
    [(1000.0, 0.0, True), (1000.0, 1000.0, False), (0.1, 0.0, False), (0.1, 1000.0, False)],
)
def test_a_choice_measured_under_load_is_measured_again_on_a_quiet_machine(
    mnist_dir, tmp_path, monkeypatch, load, cached_load, load_now, measures
):
    cache = tmp_path / "speed.json"
    steady_times = {c: [0.1 + 0.01 * i] * 4 for i, c in enumerate(candidate_settings(PLAIN, torch.device("cpu")))}
    monkeypatch.setattr(speed, "measure", lambda *args: (steady_times, {c: (2.3, 2.0) for c in steady_times}))
    tiny_fit(plain_task(), mnist_dir, callbacks=[MeasuredSpeed(cache=cache)])  # measures 32-true fastest
    (key,) = json.loads(cache.read_text())
    entry = {"choice": asdict(BF16), "why": "earlier", "measured": "2026-11-30T08:00:00+00:00"}
    cache.write_text(json.dumps({key: entry | {"load": cached_load, "cores": os.cpu_count()}}))
    load[0] = load_now
    trainer = tiny_fit(plain_task(), mnist_dir, callbacks=[MeasuredSpeed(cache=cache)])
    assert trainer.precision == (PLAIN if measures else "bf16-mixed")
    assert (json.loads(cache.read_text())[key]["load"] == 0.0) == measures


def test_the_fastest_setting_that_trains_correctly_wins(mnist_dir, tmp_path, monkeypatch):
    speeds = {Setting(): 100.0, PLAIN_CL: 110.0, BF16: 150.0, BF16_CL: 300.0}
    losses = {Setting(): (2.3, 1.0), PLAIN_CL: (2.3, 1.2), BF16: (2.31, 1.1), BF16_CL: (2.3, float("nan"))}
    monkeypatch.setattr(speed, "measure", lambda *args: ({c: [8 / v] * 4 for c, v in speeds.items()}, losses))
    callback = MeasuredSpeed(cache=tmp_path / "speed.json")
    trainer = tiny_fit(plain_task(), mnist_dir, callbacks=[callback])
    assert trainer.precision == "bf16-mixed"
    (entry,) = json.loads((tmp_path / "speed.json").read_text()).values()
    assert entry["choice"] == {"precision": "bf16-mixed", "channels_last": False}
    assert "1.50x 32-true" in entry["why"]
    assert "bf16-mixed + channels_last dropped, losses 2.300 -> nan" in entry["why"]


def test_when_no_setting_learns_the_settings_given_are_kept(mnist_dir, tmp_path, monkeypatch):
    candidates = candidate_settings(PLAIN, torch.device("cpu"))
    times = {c: [0.1 + 0.01 * i] * 4 for i, c in enumerate(candidates)}
    monkeypatch.setattr(speed, "measure", lambda *args: (times, {c: (2.3, 2.4) for c in candidates}))
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
def test_a_measured_speed_run_resumes_from_its_checkpoint(mnist_dir, tmp_path, monkeypatch, caplog, load):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(speed, "measure", steady(speed.measure))
    caplog.set_level(logging.INFO, logger="mnist_extras.speed")
    run_dir = tmp_path / "run"
    args = [*TINY_RUN, "trainer.log_every_n_steps=1", "data_module.batch_size=16", "callbacks=speed", "+seed=1"]
    args += ["callbacks.measured_speed.steps=2", "callbacks.measured_speed.warmup=1"]
    train(train_config(run_dir, mnist_dir, *args))
    assert "measured in" in caplog.text
    caplog.clear()
    last = run_dir / "checkpoints" / "last.ckpt"
    resumed = train(train_config(run_dir, mnist_dir, *args, "trainer.max_epochs=2", f"+ckpt_path={last}"))
    assert "cached 0.0 h ago" in caplog.text  # the second start reads the cache
    assert resumed["test/acc"] > 0
