import json

import pytest
import torch
import yaml
from conftest import OFFLINE, TINY_RUN, run_train

pytestmark = pytest.mark.slow


def test_fit_then_test_on_cpu_keeps_everything_in_the_run_directory(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    result = run_train(*TINY_RUN, f"data_module.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}")

    assert result.returncode == 0, result.stderr
    accuracy = float(result.stdout.split("test accuracy: ")[1].split()[0])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run_dir / "checkpoints").glob("epoch00-val_acc*.ckpt"))) == 1
    assert "test/acc" in (run_dir / "metrics.csv").read_text()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "train.log").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert "data_module" in (run_dir / "config_tree.txt").read_text()
    assert "task" in result.stdout.split("Instantiating")[0]  # the config tree comes first
    assert "epoch 1/1 " in result.stdout  # plain progress lines: stdout is not a terminal
    for picture in ("confusion_matrix.png", "learning_curve.png"):
        assert (run_dir / picture).read_bytes().startswith(b"\x89PNG")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed"
    assert record["metrics"]["test/acc"] == pytest.approx(accuracy, abs=1e-4)
    assert isinstance(record["seed"], int)  # derived from the run folder and recorded, so the run can be repeated
    log = (run_dir / "train.log").read_text()
    assert "epoch 1/1 " in log
    assert f"test accuracy: {accuracy:.4f}" in log
    assert not list(run_dir.rglob("*-ubyte"))  # the data stays in data_dir


def test_multirun_sweeps_the_three_backbones(tmp_path, mnist_dir):
    sweep_dir = tmp_path / "sweep"
    result = run_train(
        "-m",
        "task.model.backbone=resnet18,resnet34,resnet50",
        *TINY_RUN,
        f"data_module.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.count("test accuracy: ") == 3
    targets = [yaml.safe_load((sweep_dir / str(job) / ".hydra" / "config.yaml").read_text()) for job in range(3)]
    assert [t["task"]["model"]["backbone"]["_target_"] for t in targets] == [
        "backbones.ResNet18",
        "backbones.ResNet34",
        "backbones.ResNet50",
    ]
    assert all((sweep_dir / str(job) / "checkpoints" / "last.ckpt").is_file() for job in range(3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_trainer_without_a_gpu_stops_at_once_naming_trainer_cpu():
    result = run_train()
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: trainer.accelerator=gpu: PyTorch sees no CUDA GPU here; fix: train on the CPU with trainer=cpu"
    ]
    assert "Traceback" not in result.stdout + result.stderr


def test_missing_pretrained_weights_stop_before_training(tmp_path, mnist_dir):
    result = run_train(
        "trainer=cpu",
        f"data_module.data_dir={mnist_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
        env={"TORCH_HOME": str(tmp_path / "torch"), **OFFLINE},
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the ImageNet weights could not be downloaded")
    assert last.endswith("fix: train from scratch with task.model.backbone.pretrained=false")
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in last
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    # The run folder says what happened: run.json and train.log hold the same line the terminal showed.
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "failed"
    assert record["error"] == last.removeprefix("error: ")
    assert last in (tmp_path / "run" / "train.log").read_text()


def test_the_model_learns_digits_in_twenty_seconds(learned):
    """Shuffled labels or a broken loss would stay near 0.1."""
    record = json.loads((learned / "run.json").read_text())
    assert record["metrics"]["val/acc"] > 0.8, record["metrics"]
    assert record["metrics"]["test/acc"] > 0.8, record["metrics"]


# Lines a normal run must not print: library noise a user cannot act on, and a warning that is false
# on a new run.
NOISE = (
    "LeafSpec",
    "💡 Tip",
    "Total FLOPs: 0",
    "Previous log files",
    "weights_only",
    "alembic",
    "Warning:",
    "not supported by the model summary",
    "will override existing callbacks",
)


def test_a_run_prints_nothing_the_user_cannot_act_on(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    result = run_train(
        *TINY_RUN,
        "trainer.log_every_n_steps=1",
        "data_module.num_workers=8",
        "+data_module.elastic=1.0",  # without augment=true
        "+trainer.precision=bf16-mixed",
        "task.speed=auto",
        f"data_module.data_dir={mnist_dir}",
        f"hydra.run.dir={run_dir}",
        env={"XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr
    printed = result.stdout + result.stderr
    assert [line for line in printed.splitlines() if any(noise in line for noise in NOISE)] == []
    # The precision given is kept; only the memory layout was measured.
    assert "speed: bf16-mixed" in printed
    assert "32-true" not in printed.split("speed: ", 1)[1].splitlines()[0]
    log = (run_dir / "train.log").read_text()
    assert "\x1b[" not in log  # no colour codes in files
    # Settings that change nothing here are said once, on the terminal and in the log.
    assert printed.count("num_workers=8 starts no processes") == 1
    assert printed.count("pin_memory=true has no effect") == 1
    assert "pin_memory=true has no effect" in log
    assert printed.count("elastic=1.0 has no effect") == 1


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_true_precisions_train_on_batches_of_their_own_type(precision, tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    result = run_train(
        *TINY_RUN,
        f"+trainer.precision={precision}",
        "+trainer.fast_dev_run=true",
        f"data_module.data_dir={mnist_dir}",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
