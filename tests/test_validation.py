"""A config that cannot work stops before any work with one line: the key, the value, what is allowed, the fix.

The checks run in this process (compose, then mnist_extras.checks), and so do the command lines whose
exit code and one line are the point (`run_here`); a subprocess only where the process itself is: what
it imports, and a run that gets as far as Lightning.
"""

import logging
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
from conftest import compose_config, run_here, run_train, run_train_watching_imports
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from mnist_extras import checks
from mnist_extras.checks import ConfigCheck, Fixes, check_config, check_processes, check_writable
from mnist_extras.errors import ConfigError, ErrorLines, quiet_libraries, user_error
from train import CONFIG_DIR, as_group_choice

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
BASIC = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"  # a name compared, nothing imported


def refusal(*overrides: str, launcher: str | None = None, choice: str | None = None) -> str | None:
    """The one line the checks give `python train.py trainer=cpu <overrides>`, or None if they pass."""
    args = [as_group_choice(arg) for arg in ("trainer=cpu", "task.model.backbone.pretrained=false", *overrides)]
    with initialize_config_dir(config_dir=str(CONFIG_DIR)):
        cfg = compose("config", overrides=args)
        try:
            check_config(cfg, Fixes(args), launcher, choice)
        except ConfigError as err:
            return str(err)
    return None


# One bad override each, and the line it must produce.
REFUSED = {
    "task.optimizer.lr=-1": "task.optimizer.lr=-1: a finite number > 0; fix: task.optimizer.lr=5e-05",
    "task.optimizer.lr=nan": "task.optimizer.lr=nan: a finite number > 0; fix: task.optimizer.lr=5e-05",
    "task.optimizer.lr=abc": "task.optimizer.lr=abc: a finite number > 0; fix: task.optimizer.lr=5e-05",
    "task.optimizer=adamw task.optimizer.lr=-1": (
        "task.optimizer.lr=-1: a finite number > 0; fix: task.optimizer.lr=0.001"
    ),
    "task.optimizer.weight_decay=-0.1": (
        "task.optimizer.weight_decay=-0.1: a finite number >= 0; fix: task.optimizer.weight_decay=0.2"
    ),
    "task.optimizer._partial_=false": (
        "task.optimizer._partial_=false: true, since the task passes the model's parameters to the optimizer; "
        "fix: task.optimizer._partial_=true"
    ),
    "data_module.batch_size=0": (
        "data_module.batch_size=0: a whole number > 1 (BatchNorm needs more than one image per batch); "
        "fix: data_module.batch_size=64"
    ),
    "data_module.batch_size=1": (
        "data_module.batch_size=1: a whole number > 1 (BatchNorm needs more than one image per batch); "
        "fix: data_module.batch_size=64"
    ),
    "data_module.batch_size=6.5": (
        "data_module.batch_size=6.5: a whole number > 1 (BatchNorm needs more than one image per batch); "
        "fix: data_module.batch_size=64"
    ),
    "data_module.batch_size=100000": (
        "data_module.batch_size=100000: at most 55000 with drop_last=true (the training split holds 55000 images, "
        "so no batch would be left); fix: data_module.batch_size=64"
    ),
    "data_module.batch_size=3 data_module.drop_last=false": (
        "data_module.batch_size=3: a size that does not leave a last training batch of one image (55000 % 3 = 1), "
        "which BatchNorm cannot normalise; fix: data_module.drop_last=true"
    ),
    "data_module.num_workers=-2": "data_module.num_workers=-2: a whole number >= 0; fix: data_module.num_workers=8",
    "data_module.pin_memory=maybe": "data_module.pin_memory=maybe: true or false; fix: data_module.pin_memory=true",
    "+data_module.on_device=maybe": (
        "data_module.on_device=maybe: true, false, or null (on when the run has a GPU); "
        "fix: +data_module.on_device=null"
    ),
    "+experiment=mnist_997 data_module.elastic=-1": (
        "data_module.elastic=-1: a number of pixels >= 0; fix: data_module.elastic=1.0"
    ),
    "++seed=-1": "seed=-1: a whole number in [0, 4294967295]; fix: +seed=0",
    "task.model.adapter.out_features=0": (
        "task.model.adapter.out_features=0: a whole number > 0, one logit per class; "
        "fix: task.model.adapter.out_features=10"
    ),
    "+task.model.backbone.stem=round": (
        "task.model.backbone.stem=round: imagenet, digits or digits14; fix: +task.model.backbone.stem=imagenet"
    ),
    "trainer.max_epochs=abc": "trainer.max_epochs=abc: a whole number or null; fix: trainer.max_epochs=10",
    "+trainer.max_epoch=3": (
        "trainer.max_epoch=3: not an argument of pytorch_lightning.Trainer (did you mean trainer.max_epochs?); "
        "fix: trainer.max_epochs=3"
    ),
    "trainer.accelerator=npu": (
        "trainer.accelerator=npu: one of auto, gpu, cpu, cuda, mps, tpu; fix: trainer.accelerator=cpu"
    ),
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
        "data_module.data_dir=/proc/version/mnist: a folder this process can write (/proc/version is a file); "
        "fix: data_module.data_dir=./data/mnist"
    ),
}


@pytest.mark.parametrize("overrides", list(REFUSED))
def test_a_value_that_cannot_work_is_refused_in_one_line(overrides):
    assert refusal(*overrides.split()) == REFUSED[overrides]


def test_fixes_never_make_things_worse():
    """Lightning's max_epochs=None is 1,000 epochs; no run defaults to seed 42."""
    for overrides in (["trainer.max_epochs=abc"], ["~trainer.max_epochs", "+trainer.max_epochs=abc"], ["++seed=-1"]):
        line = refusal(*overrides)
        assert "max_epochs=null" not in line
        assert "seed=42" not in line


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["task.model.adapter.in_features=2048", "task.model.adapter.out_features=47"],  # a wider backbone, EMNIST
        ["data_module.num_workers=3", "data_module.batch_size=55000"],
        ["data_module.batch_size=100000", "data_module.drop_last=false"],  # one batch of 55,000
        ["+trainer.fast_dev_run=true", "+trainer.precision=bf16-mixed", "+trainer.gradient_clip_val=1.0"],
        ["+trainer.limit_train_batches=0.25", "trainer.devices=auto", "trainer.max_epochs=-1"],
        ["++seed=7", "task.optimizer._target_=torch.optim.SGD", "~task.optimizer.weight_decay"],
        ["trainer=ddp_cpu"],  # a run of its own: Lightning starts rank 1 by running the command again
        ["task.model.backbone=resnet50", "+task.model.backbone.stem=digits14"],
        ["+trainer.default_root_dir=${hydra:runtime.output_dir}"],  # resolved only once the job runs
        ["+experiment=mnist_997"],
        ["debug=fdr", "callbacks=default", "logger=default"],
    ],
)
def test_good_configs_pass(overrides, mnist_dir):
    assert refusal(f"data_module.data_dir={mnist_dir}", *overrides) is None


@pytest.mark.parametrize("launcher", [BASIC, JOBLIB, SUBMITIT_LOCAL])
def test_a_sweep_whose_jobs_cannot_start_their_own_processes_is_refused(launcher):
    line = refusal("trainer=ddp_cpu", launcher=launcher)
    assert line.startswith(f"hydra/launcher={launcher.rpartition('.')[2]} with 2 processes per job")
    assert line.endswith("fix: hydra/launcher=subprocess (each job its own train.py), or hydra/launcher=slurm")
    assert refusal("trainer=cpu", launcher=launcher) is None  # one process per job is fine there


def test_a_sweep_run_job_by_job_or_on_slurm_may_start_processes():
    for launcher in checks.OWN_PROCESS_LAUNCHERS:
        check_processes(compose_config("trainer=ddp_cpu"), launcher)


def test_intact_mnist_files_need_no_write_probe_so_a_read_only_copy_is_accepted(mnist_dir, monkeypatch):
    def no_write(key, folder, fix=None):
        raise ConfigError(f"{key}={folder} was probed")

    monkeypatch.setattr(checks, "check_writable", no_write)  # the files are there: nothing need be written
    assert refusal(f"data_module.data_dir={mnist_dir}") is None


def test_the_write_probe_makes_and_removes_no_folder(tmp_path):
    """It creates one file in the nearest folder that exists and removes only that file: a folder
    another run has just made is never removed."""
    with pytest.raises(ConfigError, match=r"hydra.run.dir=/proc/nope: a folder this process can write"):
        check_writable("hydra.run.dir", Path("/proc/nope"), "hydra.run.dir=PATH")
    (tmp_path / "other_run").mkdir()
    check_writable("hydra.run.dir", tmp_path / "new" / "run", "hydra.run.dir=PATH")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other_run"]


def sweep_config(*overrides: str, swept: list[str]):
    """The config Hydra hands a sweep's callbacks, its task overrides including the sweeps."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR)):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.overrides.task = [*overrides, *swept]
    return cfg


def test_every_point_of_a_sweep_is_checked_even_with_interpolations_in_its_overrides(capsys):
    cfg = sweep_config("trainer=cpu", swept=["task.optimizer.lr=0.1,-1", "+tag=${hydra:job.num}"])
    with initialize_config_dir(config_dir=str(CONFIG_DIR)), pytest.raises(SystemExit) as stop:
        ConfigCheck().on_multirun_start(config=cfg)
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: task.optimizer.lr=-1: a finite number > 0; fix: task.optimizer.lr=5e-05\n"


def test_a_check_that_breaks_stops_the_run_with_its_traceback(monkeypatch, capsys):
    """Hydra turns an exception in a callback into a warning and starts the run: the checks exit instead."""
    monkeypatch.setattr(checks, "check_targets", lambda cfg: 1 / 0)
    cfg = sweep_config("trainer=cpu", swept=[])
    with initialize_config_dir(config_dir=str(CONFIG_DIR)), pytest.raises(SystemExit) as stop:
        ConfigCheck().on_run_start(config=cfg)
    assert stop.value.code == 1
    assert "ZeroDivisionError" in capsys.readouterr().err


def failed_job(err: BaseException) -> JobReturn:
    job = JobReturn(overrides=["trainer=cpu"], status=JobStatus.FAILED)
    job.return_value = err
    return job


@pytest.mark.parametrize("mode", [RunMode.RUN, RunMode.MULTIRUN])
def test_a_job_that_failed_on_a_user_error_ends_in_its_line(mode, capsys):
    config = OmegaConf.create({"hydra": {"mode": mode}})
    error = ConfigError("ckpt_path=x.png: not a checkpoint; fix: pass a checkpoint written by train.py")
    if mode == RunMode.RUN:
        with pytest.raises(SystemExit) as stop:
            ErrorLines().on_job_end(config=config, job_return=failed_job(error))
        assert stop.value.code == 2
    else:  # the sweeper decides what a failed job means
        ErrorLines().on_job_end(config=config, job_return=failed_job(error))
    assert capsys.readouterr().err == f"error: {error}\n"
    ErrorLines().on_job_end(config=config, job_return=failed_job(RuntimeError("a bug")))  # left to Hydra
    assert capsys.readouterr().err == ""


def test_what_lightnings_trainer_refuses_names_the_key():
    with pytest.raises(MisconfigurationException) as raised:
        pl.Trainer(accelerator="cpu", limit_train_batches=1.5, logger=False)
    assert user_error(raised.value).startswith(
        "trainer.limit_train_batches: You have passed invalid value 1.5 for limit_train_batches"
    )
    unknown_part = type("UnknownPart", (ValueError,), {})("_target_=os.system: a checkpoint may name only ...")
    assert user_error(unknown_part).endswith("; fix: pass a checkpoint written by train.py")


def test_library_lines_no_user_can_act_on_are_quieted(caplog):
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("Precision bf16-mixed is not supported by the model summary. ...", UserWarning, stacklevel=1)
        warnings.warn("a warning that matters", UserWarning, stacklevel=1)
    assert [str(w.message) for w in shown] == ["a warning that matters"]
    with caplog.at_level(logging.INFO):
        pl.utilities.rank_zero_info("💡 Tip: For seamless cloud logging ...")
        pl.utilities.rank_zero_info("GPU available: False")
    assert "Tip" not in caplog.text
    assert "GPU available" in caplog.text


# The command line: exit codes, and runs or sweeps that must not start.


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("task.model.backbone=resnet19", "Available options in 'task/model/backbone'"),
        ("trainer.max_epoch=3", "Did you mean: 'max_epochs'?"),
        ("data_module.data_dir=/tmp/dïgits", "LexerNoViableAltException"),
    ],
)
def test_a_command_line_hydra_cannot_compose_is_a_usage_error(override, said, tmp_path, capsys, monkeypatch):
    """Hydra's own message, and exit code 2: Hydra exits 1, as for a crash."""
    args = [override, "trainer=cpu", f"hydra.run.dir={tmp_path / 'run'}"]
    assert run_here("train.py", *args, monkeypatch=monkeypatch) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_bad_value_stops_before_torch_is_imported_and_leaves_no_folder(tmp_path):
    result = run_train_watching_imports("trainer=cpu", "data_module.batch_size=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"error: {REFUSED['data_module.batch_size=1']}"]
    assert "HEAVY []" in result.stdout
    assert not (tmp_path / "run").exists()


def test_hydra_full_error_adds_the_traceback_and_still_refuses(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    args = ["trainer=cpu", "task.optimizer.lr=-1", f"hydra.run.dir={tmp_path / 'run'}"]
    assert run_here("train.py", *args, monkeypatch=monkeypatch) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" in stderr
    assert stderr.splitlines()[-1] == f"error: {REFUSED['task.optimizer.lr=-1']}"
    assert not (tmp_path / "run").exists()


def test_a_sweep_with_an_interpolation_in_an_override_is_checked_before_it_starts(tmp_path, capsys, monkeypatch):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "trainer=cpu", "task.optimizer.lr=-1,0.1", "+tag=${hydra:job.num}", f"hydra.sweep.dir={sweep_dir}"]
    assert run_here("train.py", *args, monkeypatch=monkeypatch) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {REFUSED['task.optimizer.lr=-1']}"]
    assert not sweep_dir.exists()


def test_a_ddp_sweep_on_hydras_own_launcher_is_refused_naming_the_one_that_works(tmp_path, capsys, monkeypatch):
    """Lightning would start rank 1 of each job by running `train.py -m ...` again: the whole sweep."""
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "trainer=ddp_cpu", "hydra/launcher=basic", "+seed=1,2", f"hydra.sweep.dir={sweep_dir}"]
    assert run_here("train.py", *args, monkeypatch=monkeypatch) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: hydra/launcher=basic with 2 processes per job")
    assert "fix: hydra/launcher=subprocess" in line
    assert not sweep_dir.exists()


def test_a_gpu_trainer_without_a_gpu_stops_naming_trainer_cpu(tmp_path, mnist_dir, capsys, monkeypatch):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = [f"data_module.data_dir={mnist_dir}", f"hydra.run.dir={tmp_path / 'run'}"]
    assert run_here("train.py", *args, monkeypatch=monkeypatch) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: trainer.accelerator=gpu: PyTorch sees no CUDA GPU here; fix: train on the CPU with trainer=cpu"
    ]
    assert not (tmp_path / "run").exists()


def test_an_error_in_the_run_ends_in_its_line_on_the_terminal_and_in_the_log(tmp_path, mnist_dir):
    """Lightning refuses limit_train_batches=1.5 when train.py builds the Trainer, after the checks."""
    run_dir = tmp_path / "run"
    result = run_train(
        "trainer=cpu",
        "task.model.backbone.pretrained=false",
        "+trainer.limit_train_batches=1.5",
        f"data_module.data_dir={mnist_dir}",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 2, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: trainer.limit_train_batches: You have passed invalid value 1.5")
    assert "Error executing job" not in result.stderr
    assert line in (run_dir / "train.log").read_text()


@pytest.mark.parametrize(
    ("content", "said"), [(b"hello", "it is a text file, not a checkpoint"), (None, "no such file")]
)
def test_a_ckpt_path_that_is_no_checkpoint_stops_the_run_in_one_line(tmp_path, content, said, capsys, monkeypatch):
    path = tmp_path / "not.ckpt"
    if content is not None:
        path.write_bytes(content)
    args = ["trainer=cpu", f"+ckpt_path={path}", f"hydra.run.dir={tmp_path / 'run'}"]
    assert run_here("train.py", *args, monkeypatch=monkeypatch) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: ckpt_path={path}: {said}; fix: pass a checkpoint written by train.py"
    ]
    assert not (tmp_path / "run").exists()
