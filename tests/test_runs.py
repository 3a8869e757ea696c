"""Fast checks of the pieces behind resume, checkpoints, loggers, summaries and predict."""

import csv
import os
import time

import numpy as np
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from PIL import Image

import checkpoints
from mnist_extras.checkpoints import AtomicCheckpointIO
from mnist_extras.errors import (
    CONFIG_DIR,
    ConfigError,
    command_line,
    find_last_checkpoint,
    quoted,
    resolve_checkpoint,
    spell_for_hydra,
    user_error,
)
from predict import to_mnist
from mnist_extras.records import ContinuedCSVLogger
from mnist_extras.sweeps import summary_rows, write_record, write_summary


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("seed=3", "++seed=3"),
        ("ckpt_path=last", "++ckpt_path=last"),
        ("++seed=3", "++seed=3"),
        ("inputs=x", "inputs=x"),
    ],
)
def test_run_keys_absent_from_config_yaml_are_added_with_plus_plus(given, expected):
    assert spell_for_hydra(given, CONFIG_DIR) == expected


@pytest.mark.parametrize(
    "path", ["/tmp/plain/last.ckpt", "/tmp/it's here/a b.ckpt", r"C:\runs\x\last.ckpt", "/tmp/end\\"]
)
def test_quoted_paths_read_back_as_themselves(path):
    assert OverridesParser.create().parse_override(f"ckpt_path={quoted(path)}").value() == path


def make_checkpoint(path, mtime):
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    os.utime(path, (mtime, mtime))
    return path


def test_ckpt_path_last_is_the_newest_last_ckpt_of_any_run_or_sweep_job(tmp_path):
    now = time.time()
    make_checkpoint(tmp_path / "outputs" / "2024-01-01" / "10-00-00" / "checkpoints" / "last.ckpt", now - 60)
    newest = make_checkpoint(tmp_path / "multirun" / "2024-01-01" / "11-00-00" / "1" / "checkpoints" / "last.ckpt", now)
    make_checkpoint(tmp_path / "outputs" / "2024-01-02" / "09-00-00" / "checkpoints" / "epoch00.ckpt", now + 60)

    roots = (tmp_path / "outputs", tmp_path / "multirun")
    assert find_last_checkpoint(roots) == newest
    assert resolve_checkpoint("last", roots) == newest.resolve()


def test_ckpt_path_last_without_runs_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"ckpt_path=last .* ckpt_path=outputs/DATE/TIME/checkpoints/last.ckpt"):
        resolve_checkpoint("last", (tmp_path / "outputs",))
    with pytest.raises(ConfigError, match=r"ckpt_path=nowhere.ckpt: not a file"):
        resolve_checkpoint("nowhere.ckpt")


def test_resume_recalls_the_runs_overrides_and_folder_and_lets_new_ones_win(tmp_path):
    run_dir = tmp_path / "run"
    ckpt = make_checkpoint(run_dir / "checkpoints" / "last.ckpt", time.time())
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        "- trainer=cpu\n- trainer.max_epochs=1\n- +trainer.limit_train_batches=3\n- ++seed=7\n- ++ckpt_path=old.ckpt\n"
    )

    args = command_line([f"ckpt_path={ckpt}", "trainer.max_epochs=2", "+trainer.limit_train_batches=5"])

    assert args == [
        "trainer=cpu",
        "++seed=7",
        f"++ckpt_path='{ckpt}'",
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=5",
        f"hydra.run.dir='{run_dir}'",
    ]
    # Lightning's DDP processes re-run the command line as it now is: they must arrive at the same one.
    assert command_line(args) == args


def test_both_group_spellings_are_one_key_when_a_run_continues(tmp_path):
    run_dir = tmp_path / "run"
    ckpt = make_checkpoint(run_dir / "checkpoints" / "last.ckpt", time.time())
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("- task/model/backbone=resnet34\n")
    args = command_line([f"ckpt_path={ckpt}", "task.model.backbone=resnet50"])
    assert "task/model/backbone=resnet50" in args
    assert not any("resnet34" in arg for arg in args)


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 1}, path)

    def crash_before_the_data_is_on_disk(fd):
        raise OSError("No space left on device")

    # The new checkpoint is fully written but not yet flushed to disk when the "crash" comes.
    monkeypatch.setattr(checkpoints.os, "fsync", crash_before_the_data_is_on_disk)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"epoch": 2}, path)

    assert torch.load(path) == {"epoch": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no partial file left behind


def test_a_full_disk_is_named_with_the_space_needed_and_the_last_checkpoint_stays(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 1}, path)

    def disk_full(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoints.torch, "save", disk_full)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: shutil_usage(free=5 * 2**20))
    with pytest.raises(OSError, match=r"no space left to write the checkpoint last.ckpt in .*40 MB and 5 MB") as err:
        io.save_checkpoint({"epoch": 2, "weights": torch.zeros(10 * 2**20)}, path)
    assert torch.load(path) == {"epoch": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    assert user_error(err.value).endswith("fix: free space there, or write the run elsewhere with hydra.run.dir=PATH")


def shutil_usage(free: int):
    from collections import namedtuple

    return namedtuple("usage", "total used free")(free * 10, free * 9, free)


def test_a_continued_csv_log_keeps_the_rows_before_the_checkpoint_once(tmp_path):
    first = ContinuedCSVLogger(str(tmp_path))
    for step in range(6):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.save()
    assert first.purge_step is None

    # Continued from a checkpoint taken at step 4: steps 4 and 5 are logged again.
    second = ContinuedCSVLogger(str(tmp_path), purge_step=4)
    for step in (4, 5, 6):
        second.log_metrics({"train/loss": 10.0 + step, "val/acc": 0.5}, step=step)
    second.save()

    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(row["step"]) for row in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert [float(row["train/loss"]) for row in rows] == [0, 1, 2, 3, 14, 15, 16]
    assert rows[0]["val/acc"] == ""
    assert rows[-1]["val/acc"] == "0.5"


def test_summary_rows_mark_a_job_that_never_ended_as_interrupted(tmp_path):
    write_record(
        tmp_path / "0",
        {
            "overrides": ["task.optimizer.lr=0.01"],
            "status": "completed",
            "params": 10,
            "epochs": 3,
            "metrics": {"val/acc_best": 0.9, "test/acc": 0.89},
            "wall_time_s": 12.34,
        },
    )
    write_record(tmp_path / "1", {"overrides": ["task.optimizer.lr=0.1"], "status": "running"})
    (tmp_path / "10").mkdir()  # a job that died before writing anything
    (tmp_path / ".submitit").mkdir()

    rows = write_summary(tmp_path)

    assert [(row["job"], row["status"]) for row in rows] == [(0, "completed"), (1, "interrupted"), (10, "interrupted")]
    assert rows[0]["test acc"] == 0.89
    assert rows[0]["wall time (s)"] == 12.3
    assert summary_rows(tmp_path) == rows
    assert (tmp_path / "summary.md").read_text().count("\n") == 5
    assert (tmp_path / "comparison.png").stat().st_size > 0


def mnist_like_digit() -> np.ndarray:
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[6:22, 12:16] = 255  # a "1", off centre
    digit[6:9, 9:12] = 200
    return digit


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_images_are_converted_as_mnist_was_made(mode):
    light_on_dark = Image.fromarray(np.kron(mnist_like_digit(), np.ones((5, 3), dtype=np.uint8)))  # 140x84, stretched
    dark_on_light = Image.fromarray(255 - np.asarray(light_on_dark)).convert(mode)

    for image in (light_on_dark, dark_on_light):
        pixels = to_mnist(image)
        assert pixels.shape == (28, 28)
        assert pixels.dtype == np.uint8
        rows, cols = np.nonzero(pixels > 25)
        assert max(np.ptp(rows), np.ptp(cols)) + 1 <= 20  # the digit fits in 20x20
        assert np.ptp(rows) + 1 >= 19  # and fills it along its longer side
        mass = pixels.astype(float)
        centre = (mass.sum(1) @ np.arange(28) / mass.sum(), mass.sum(0) @ np.arange(28) / mass.sum())
        assert centre == pytest.approx((14, 14), abs=0.75)
        assert pixels[0].max() == 0  # black background
    np.testing.assert_array_equal(to_mnist(light_on_dark), to_mnist(dark_on_light))


def test_a_blank_image_is_refused():
    with pytest.raises(ValueError, match="blank"):
        to_mnist(Image.new("L", (50, 50), 255))


def test_the_progress_bar_counts_epochs_as_the_epoch_lines_do_and_hides_the_sanity_check(tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.demos.boring_classes import BoringModel

    from mnist_extras.records import EpochBar

    class LogsAccuracy(BoringModel):
        def validation_step(self, batch, batch_idx):
            self.log("val/acc", 0.5, prog_bar=True)
            return super().validation_step(batch, batch_idx)

    class Probe(pl.Callback):
        seen: list = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                self.seen.append(
                    (bar._get_train_description(trainer.current_epoch).strip(), bar.get_metrics(trainer, pl_module))
                )

    bar = EpochBar()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[bar, Probe()],
        default_root_dir=tmp_path,
    )
    trainer.fit(LogsAccuracy())
    (first, before), (second, after) = Probe.seen
    assert (first, second) == ("Epoch 1/2", "Epoch 2/2")
    assert "val/acc" not in before  # only the sanity check had validated
    assert after["val/acc"] == 0.5


def test_a_search_trial_continues_as_a_run_not_as_a_new_search(tmp_path):
    run_dir = tmp_path / "sweep" / "3"
    ckpt = make_checkpoint(run_dir / "checkpoints" / "last.ckpt", time.time())
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("- task.optimizer.lr=0.001\n- hparams_search=mnist_optuna\n")
    args = command_line([f"ckpt_path={ckpt}"])
    assert "task.optimizer.lr=0.001" in args
    assert not any(arg.startswith("hparams_search") for arg in args)  # its file sets hydra.mode: MULTIRUN
