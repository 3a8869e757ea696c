"""The core in the process, as lightning-hydra-template tests it: compose, set Hydra's runtime
config, `train(cfg)`. Subprocess runs stay where the behaviour is the command line."""

import csv

import pytest
import torch
from conftest import TINY_RUN, train_config
from hydra.utils import instantiate
from omegaconf import open_dict

import tasks
from tasks import MNISTClassification
from train import train


def test_a_fast_dev_run_fits_and_tests_in_the_process(tmp_path, mnist_dir):
    cfg = train_config(tmp_path, mnist_dir, *TINY_RUN)
    with open_dict(cfg):
        cfg.trainer.fast_dev_run = True
    metrics = train(cfg)
    assert 0 <= metrics["test/acc"] <= 1


def test_the_model_learns_digits_in_twenty_seconds(learned):
    """Shuffled labels or a broken loss would stay near 0.1."""
    run_dir, _, metrics = learned
    assert metrics["test/acc"] > 0.8, metrics
    # train() returns the test's metrics; validation's are in metrics.csv.
    rows = list(csv.DictReader((run_dir / "metrics.csv").read_text().splitlines()))
    [val] = [row for row in rows if row.get("val/acc")]
    assert float(val["val/acc"]) > 0.8, val
    assert float(val["val/acc_best"]) == pytest.approx(float(val["val/acc"]))  # one epoch: its accuracy is the best
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_load_from_checkpoint_returns_the_trained_task_in_one_call(learned, mnist_dir):
    run_dir, cfg, metrics = learned
    last = run_dir / "checkpoints" / "last.ckpt"
    task = MNISTClassification.load_from_checkpoint(last).eval()
    # The same weights, put by hand into a task built from the config: the same predictions.
    by_hand = instantiate(cfg.task)
    by_hand.load_state_dict(torch.load(last, weights_only=True)["state_dict"])
    by_hand.eval()
    datamodule = instantiate(cfg.data_module, data_dir=str(mnist_dir))
    datamodule.setup("test")
    right = seen = 0
    with torch.no_grad():
        for batch_idx, batch in enumerate(datamodule.test_dataloader()):
            if batch_idx == cfg.trainer.limit_test_batches:
                break
            images, labels = datamodule.on_after_batch_transfer(batch, 0)
            logits = task(images)
            torch.testing.assert_close(logits, by_hand(images))
            right += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
    # One epoch: the best checkpoint the run tested is the last one.
    assert right / seen == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_a_checkpoint_naming_code_is_refused(learned, tmp_path):
    run_dir, _, _ = learned
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["model"]["backbone"] = {
        "_target_": "torch.load",
        "f": str(tmp_path / "payload.pt"),  # would unpickle, and so run, whatever that file holds
        "weights_only": False,
    }
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(tasks.UnknownPart, match="'torch.load' is not in the Hydra execution whitelist"):
        MNISTClassification.load_from_checkpoint(tmp_path / "evil.ckpt")
