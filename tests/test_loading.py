"""Checkpoints are data: eval.py and predict.py rebuild only what train.py wrote, and refuse anything
else in one line (exit code 2) without running a byte of its code."""

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import run_here, run_train
from hydra.utils import UNSAFE_DISABLE_EXECUTION_CHECKS, instantiate
from PIL import Image
from torchvision.datasets.mnist import read_image_file

import predict
from mnist_extras.errors import ConfigError
from mnist_extras.loading import load_task, read_checkpoint
from tasks import MNISTClassification

FIX = "; fix: pass a checkpoint written by train.py"


@pytest.fixture(scope="session")
def trained(learned) -> Path:
    """`last.ckpt` of the session's learning run (conftest.py)."""
    return learned[0] / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def digits(tmp_path_factory, mnist_dir) -> Path:
    """A folder of eight MNIST test digits as 60x60 PNGs, and a note that is not an image."""
    folder = tmp_path_factory.mktemp("digits")
    for i, digit in enumerate(read_image_file(str(mnist_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte"))[:8]):
        Image.fromarray(digit.numpy()).resize((60, 60)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


class RunsCode:
    """Unpickling this makes a folder: proof that the loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def hostile_checkpoint(folder: Path) -> tuple[Path, Path]:
    """A checkpoint shaped like train.py's whose backbone is `torch.load` of a second file, which
    runs code when unpickled; and the folder that code makes."""
    marker, payload = folder / "ran", folder / "payload.pt"
    torch.save(RunsCode(marker), payload)
    task_cfg = {
        "_target_": "tasks.MNISTClassification",
        "model": {
            "_target_": "models.SimpleModel",
            "backbone": {"_target_": "torch.load", "f": str(payload), "weights_only": False},
            "adapter": {"_target_": "adapters.LinearAdapter", "in_features": 512, "out_features": 10},
            "head": {"_target_": "heads.IdentityHead"},
        },
        "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 5e-5},
        "loss_function": {"_target_": "loss_functions.CrossEntropyLoss"},
    }
    path = folder / "evil.ckpt"
    # `config` is where train.py kept the task's config before hyper_parameters, and eval.py built it from.
    checkpoint = {"state_dict": {}, "hyper_parameters": task_cfg, "config": {"task": task_cfg}}
    torch.save({**checkpoint, "pytorch-lightning_version": "2.6.6"}, path)
    return path, marker


def test_the_hostile_checkpoint_runs_code_when_its_config_is_instantiated(tmp_path):
    # What eval.py and predict.py did before: instantiate the config a checkpoint stores, with no whitelist.
    path, marker = hostile_checkpoint(tmp_path)
    backbone = torch.load(path, weights_only=True)["config"]["task"]["model"]["backbone"]
    instantiate(backbone, _execution_whitelist_=UNSAFE_DISABLE_EXECUTION_CHECKS)
    assert marker.is_dir()


@pytest.mark.parametrize("script", ["eval.py", "predict.py"])
def test_a_checkpoint_that_names_code_is_refused_in_one_line_and_runs_none(
    tmp_path, digits, script, capsys, monkeypatch
):
    path, marker = hostile_checkpoint(tmp_path)
    args = [f"ckpt_path={path}", "trainer=cpu"] if script == "eval.py" else [f"ckpt_path={path}", f"inputs={digits}"]

    assert run_here(script, *args, monkeypatch=monkeypatch) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: ckpt_path={path}: its hyper_parameters name _target_=torch.load at model.backbone, "
        f"not a part of this project{FIX}"
    ]
    assert not marker.exists()


def test_a_checkpoint_naming_a_part_of_yours_missing_from_parts_says_where_to_add_it(tmp_path):
    """A backbone a user added to backbones.py but not to tasks.PARTS: the fix is PARTS, not another file."""
    path, _ = hostile_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["model"]["backbone"] = {"_target_": "backbones.SmallCNN"}
    torch.save(checkpoint, path)
    with pytest.raises(ConfigError) as refused:
        read_checkpoint(path)
    assert str(refused.value) == (
        f"ckpt_path={path}: its hyper_parameters name _target_=backbones.SmallCNN at model.backbone, not a part of "
        "this project; fix: if it is a part of yours, add it to tasks.PARTS"
    )


def not_checkpoints(folder: Path, trained: Path) -> dict[str, Path]:
    """One file of each kind a user might pass by mistake, or an attacker on purpose."""
    files = {name: folder / name for name in ("digit.png", "notes.txt", "empty.ckpt", "foreign.pt", "plain.pkl")}
    Image.new("L", (28, 28)).save(files["digit.png"])
    files["notes.txt"].write_text("epoch=3 val/acc=0.99\n")
    files["empty.ckpt"].touch()
    torch.save({"state_dict": {}, "sampler": zipfile.ZipFile}, files["foreign.pt"])  # a class: not plain data
    files["plain.pkl"].write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    files["hostile.pkl"] = folder / "hostile.pkl"
    files["hostile.pkl"].write_bytes(pickle.dumps(RunsCode(folder / "ran")))
    files["hostile.pt"] = folder / "hostile.pt"
    torch.save({"state_dict": RunsCode(folder / "ran")}, files["hostile.pt"])
    files["notes.zip"] = folder / "notes.zip"
    with zipfile.ZipFile(files["notes.zip"], "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")
    files["last.ckpt"] = folder / "checkpoints" / "last.ckpt"  # a copy cut short, as a crash mid-write leaves one
    files["last.ckpt"].parent.mkdir()
    files["last.ckpt"].write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    files["no_hparams.ckpt"] = folder / "no_hparams.ckpt"
    torch.save({"state_dict": torch.load(trained, weights_only=True)["state_dict"]}, files["no_hparams.ckpt"])
    return files


KINDS = [
    "digit.png", "notes.txt", "empty.ckpt", "foreign.pt", "plain.pkl", "hostile.pkl", "hostile.pt", "notes.zip",
    "last.ckpt", "no_hparams.ckpt",
]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory, trained) -> dict[str, Path]:
    return not_checkpoints(tmp_path_factory.mktemp("not_checkpoints"), trained)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_file_that_is_not_a_checkpoint_of_the_project_ends_in_one_line(files, kind, digits, capsys, monkeypatch):
    path = files[kind]
    with pytest.raises(ConfigError) as refused:
        read_checkpoint(path)
    message = str(refused.value)
    assert message.startswith(f"ckpt_path={path}: ")
    assert message.endswith(FIX)
    assert "\n" not in message
    assert "weights_only" not in message.split(": ", 1)[1]  # never torch's advice to unpickle it

    for script, args in (("eval.py", ["trainer=cpu"]), ("predict.py", [f"inputs={digits}"])):
        assert run_here(script, f"ckpt_path={path}", *args, monkeypatch=monkeypatch) == 2, script
        assert capsys.readouterr().err.splitlines() == [f"error: {message}"], script
    assert not (path.parent / "ran").exists()


@pytest.mark.slow
def test_each_kind_is_told_apart(files):
    said = {}
    for kind in KINDS:
        with pytest.raises(ConfigError) as refused:
            read_checkpoint(files[kind])
        said[kind] = str(refused.value).split(": ", 1)[1].removesuffix(FIX)
    assert said["empty.ckpt"] == "the file is empty"
    assert said["digit.png"] == "it is an image, not a checkpoint"
    assert said["notes.txt"] == "it is a text file, not a checkpoint"
    assert "cut short" in said["last.ckpt"]
    assert "no hyper_parameters" in said["no_hparams.ckpt"]
    unpickled = "it holds objects other than tensors and plain values, so it was not unpickled"
    assert said["foreign.pt"] == said["hostile.pt"] == unpickled


@pytest.mark.slow
def test_lightnings_loading_call_returns_the_trained_task_in_one_call(trained):
    task = MNISTClassification.load_from_checkpoint(trained)

    stored = torch.load(trained, weights_only=True)["state_dict"]
    assert task.state_dict().keys() == stored.keys()
    assert all(torch.equal(task.state_dict()[name], tensor) for name, tensor in stored.items())
    loaded = load_task(trained)  # what eval.py and predict.py use: the same weights, ready for inference
    assert not loaded.training
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in stored.items())


@pytest.mark.slow
def test_predict_prints_a_digit_for_each_image_of_a_folder(trained, digits, capsys):
    assert predict.main([f"ckpt_path={trained}", f"inputs={digits}"]) == 0

    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["file", "digit", "confidence"]
    assert [Path(row.split()[0]).name for row in rows] == [f"{i}.png" for i in range(8)]
    assert all(row.split()[1] in "0123456789" and 0 < float(row.split()[2]) <= 1 for row in rows)


def test_predict_refuses_a_decompression_bomb_in_one_line(tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (14000, 14000)).save(bomb)  # 196 million pixels in 24 kB
    (tmp_path / "any.ckpt").touch()  # the images are read first: a bomb is refused before any checkpoint is

    assert predict.main([str(tmp_path / "any.ckpt"), str(bomb)]) == 2

    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: inputs: {bomb} has more than {Image.MAX_IMAGE_PIXELS:,} pixels")


@pytest.mark.slow
def test_eval_tests_the_checkpoint_with_the_data_and_trainer_of_its_own_command_line(trained, mnist_dir, tmp_path):
    result = run_train(
        f"ckpt_path={trained}",
        "trainer=cpu",
        "+trainer.limit_test_batches=2",
        "data_module.num_workers=0",
        f"data_module.data_dir={mnist_dir}",
        f"hydra.run.dir={tmp_path}",
        script="eval.py",
    )

    assert result.returncode == 0, result.stderr
    assert "test accuracy: " in result.stdout
    assert "on 128 test images" in result.stdout  # two batches of 64
    assert (tmp_path / ".hydra" / "overrides.yaml").read_text().count("ckpt_path") == 1


def test_eval_exits_2_for_a_config_hydra_cannot_compose(trained, tmp_path, monkeypatch, capsys):
    args = [f"ckpt_path={trained}", "trainer=cpux", f"hydra.run.dir={tmp_path}"]
    assert run_here("eval.py", *args, monkeypatch=monkeypatch) == 2
    assert "Available options in 'trainer'" in capsys.readouterr().err


def test_eval_needs_a_checkpoint(monkeypatch, capsys):
    assert run_here("eval.py", "trainer=cpu", monkeypatch=monkeypatch) == 2
    assert capsys.readouterr().err.startswith("error: ckpt_path is not set; fix: python eval.py ckpt_path=PATH")


@pytest.mark.slow
def test_evals_command_line_is_a_fixed_point_for_ddp_processes(trained, tmp_path):
    import importlib

    eval_script = importlib.import_module("eval")
    folder = tmp_path / "Läufe 'neu'\\"  # what Hydra's grammar takes only quoted and escaped
    folder.mkdir()
    os.link(trained, folder / "last.ckpt")
    once = eval_script.command_line([f"ckpt_path={folder / 'last.ckpt'}", "trainer=cpu"])
    assert once[0] == "trainer=cpu"
    assert eval_script.command_line(once) == once
    assert eval_script.hydra_value(once[1].partition("=")[2]) == str(folder / "last.ckpt")
