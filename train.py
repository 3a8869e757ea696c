"""Train an MNIST classifier whose parts Hydra composes from configs/.

    python train.py trainer=cpu task.model.backbone.pretrained=false   # train and test on CPU
    python train.py task.model.backbone=resnet50                       # pick a config-group option
    python train.py task.optimizer.lr=0.001 data_module.batch_size=128 # change values
    python train.py -m task.model.backbone=resnet18,resnet34,resnet50  # one run per backbone
    python train.py --cfg job                                          # print the composed config
    python train.py trainer=cpu seed=3                                 # a repeatable CPU run
    python train.py ckpt_path=last                                     # continue the newest run
    python train.py -m hparams_search=mnist_optuna                     # Optuna search on val/acc

torch and Lightning are imported inside `train`, so printing a config or --help stays instant.
`seed` and `ckpt_path` are not in configs/config.yaml (its `--cfg job` output is the spec's); the
command line adds them (`seed=3` is read as Hydra's `++seed=3`).
"""

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import hydra
from omegaconf import DictConfig

from validation import ConfigError, check_accelerator, check_group_choices, exit_on_config_error, validate

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PROJECT_DIR / "configs"
RUN_KEYS = ("seed", "ckpt_path")
# Where Hydra puts runs and sweeps by default, relative to the folder a run starts in.
RUN_ROOTS = (Path("outputs"), Path("multirun"))


def group_overrides(args: list[str], config_dir: Path = CONFIG_DIR, run_keys: tuple[str, ...] = RUN_KEYS) -> list[str]:
    """Spell `task.model.backbone=resnet50` as Hydra's `task/model/backbone=resnet50`, `seed=3` as `++seed=3`.

    The spec selects config-group options with dots; plain Hydra would read that as "replace
    the backbone node with the string 'resnet50'". Only keys that name a folder under configs/
    are rewritten, so value overrides such as `task.optimizer.lr=0.001` are left as they are.
    `run_keys` are absent from config.yaml, and `++` adds them.
    """
    rewritten = []
    for arg in args:
        key, equals, value = arg.partition("=")
        name = key.lstrip("+~")
        prefix = key[: len(key) - len(name)]
        if equals and "." in name and "/" not in name and (config_dir / name.replace(".", "/")).is_dir():
            arg = f"{prefix}{name.replace('.', '/')}={value}"
        elif equals and not prefix and name in run_keys:
            arg = f"++{name}={value}"
        rewritten.append(arg)
    return rewritten


def override_key(arg: str) -> str | None:
    """`+task/model/backbone=resnet50` -> `task.model.backbone`; None for options such as `-m`."""
    key, equals, _ = arg.partition("=")
    return key.lstrip("+~").replace("/", ".") if equals and not key.startswith("-") else None


def merge_overrides(recorded: list[str], given: list[str]) -> list[str]:
    """A run's recorded overrides, less `ckpt_path` and the keys `given` sets again, then `given`."""
    replaced = {override_key(arg) for arg in given} | {"ckpt_path"}
    return [arg for arg in recorded if override_key(arg) not in replaced] + given


def find_last_checkpoint(roots: tuple[Path, ...] = RUN_ROOTS) -> Path | None:
    """The most recently written `checkpoints/last.ckpt` of any run or sweep job under `roots`."""
    found = [path for root in roots if root.is_dir() for path in root.glob("**/checkpoints/last.ckpt")]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def resolve_checkpoint(value: str, roots: tuple[Path, ...] = RUN_ROOTS) -> Path:
    """`ckpt_path=last` or a path, as an existing checkpoint file."""
    if value == "last":
        found = find_last_checkpoint(roots)
        if found is None:
            raise ConfigError(
                f"ckpt_path=last but there is no checkpoints/last.ckpt under {' or '.join(map(str, roots))} "
                "here; run from the project folder or give the file: ckpt_path=outputs/DATE/TIME/checkpoints/last.ckpt"
            )
        return found.resolve()
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={value} is not a file; give a .ckpt file written by train.py, or ckpt_path=last")
    return path


def resume_overrides(args: list[str], roots: tuple[Path, ...] = RUN_ROOTS) -> list[str]:
    """Make `ckpt_path=...` continue the run its checkpoint came from.

    The checkpoint's run folder (the parent of `checkpoints/`) becomes this run's folder, and
    that run's recorded overrides come first, so `python train.py ckpt_path=last` alone trains on
    with the same config; overrides given now (`trainer.max_epochs=20`) replace recorded ones.
    A sweep resumes by being run again into its folder, not with ckpt_path.
    """
    value = next((arg.partition("=")[2] for arg in args if override_key(arg) == "ckpt_path"), None)
    if value is None or {"-m", "--multirun"} & set(args):
        return args
    path = resolve_checkpoint(value, roots)
    given = [f"++ckpt_path={quoted(path)}" if override_key(arg) == "ckpt_path" else arg for arg in args]
    run_dir = path.parent.parent
    recorded = run_dir / ".hydra" / "overrides.yaml"
    if path.parent.name != "checkpoints" or not recorded.is_file():
        return given
    from omegaconf import OmegaConf

    run_dir_given = any(override_key(arg) == "hydra.run.dir" for arg in args)
    run_dir_arg = [] if run_dir_given else [f"hydra.run.dir={quoted(run_dir)}"]
    return merge_overrides(list(OmegaConf.load(recorded)), given) + run_dir_arg


def quoted(path: Path) -> str:
    """A path as a quoted Hydra override value, whatever characters it holds."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured task, test its best checkpoint, and return the metrics.

    In a sweep, a job whose folder records a finished run returns that run's metrics, and one that
    left a `last.ckpt` continues from it: running a sweep again into its folder completes it.
    """
    validate(cfg, PROJECT_DIR)
    check_accelerator(cfg.trainer)

    import secrets

    import pytorch_lightning as pl
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from hydra.utils import instantiate
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.utilities import rank_zero_only
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from checkpoints import AtomicCheckpointIO, RunState, SaveOnInterrupt
    from reports import ConfusionMatrixPlot, History, build_loggers, print_config, progress_bar, save_learning_curve
    from sweeps import read_record, write_record

    started = time.perf_counter()
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    ckpt_path = cfg.get("ckpt_path")
    if hydra_cfg.mode == RunMode.MULTIRUN:
        previous = read_record(output_dir)
        if previous is not None and previous.get("overrides") != overrides:
            raise ConfigError(
                f"hydra.sweep.dir={hydra_cfg.sweep.dir} already holds job {hydra_cfg.job.num} with overrides "
                f"{previous.get('overrides')}, not {overrides}; run the same sweep again or pick a new hydra.sweep.dir"
            )
        if previous is not None and previous["status"] == "completed":
            print(f"job {hydra_cfg.job.num} finished before ({output_dir / 'run.json'}); skipping it")
            return previous["metrics"]
        interrupted = output_dir / "checkpoints" / "last.ckpt"
        if ckpt_path is None and interrupted.is_file():
            log.info("Resuming job %s from %s", hydra_cfg.job.num, interrupted)
            ckpt_path = str(interrupted)
    # A run without a seed draws one and records it, so any run can be repeated. The other DDP
    # processes start after seed_everything and take its seed from the environment it sets.
    is_rank_zero = rank_zero_only.rank == 0
    seed = cfg.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**31) if is_rank_zero else int(os.environ["PL_GLOBAL_SEED"])
    record = {"overrides": overrides, "seed": seed, "status": "running"}
    if is_rank_zero:
        write_record(output_dir, record)
        print_config(cfg, output_dir)
    pl.seed_everything(seed, workers=True)

    log.info("Instantiating task <%s>", cfg.task._target_)
    task = instantiate(cfg.task)
    log.info("Instantiating data module <%s>", cfg.data_module._target_)
    # A relative data_dir is the project's own folder, shared by every run, not a per-run copy.
    datamodule = instantiate(cfg.data_module, data_dir=str(PROJECT_DIR / cfg.data_module.data_dir))
    log.info("Instantiating trainer <%s>", cfg.trainer._target_)
    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="epoch{epoch:02d}-val_acc{val/acc:.4f}",
        auto_insert_metric_name=False,
        monitor="val/acc",
        mode="max",
    )
    # Lightning 2.6's save_last writes last.ckpt only in epochs that improve the best, so a resume
    # could lose epochs; this second callback rewrites last.ckpt after every epoch.
    last = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="last", enable_version_counter=False)
    history = History()
    trainer = instantiate(
        cfg.trainer,
        default_root_dir=str(output_dir),
        callbacks=[
            checkpoint,
            last,
            history,
            RunState(cfg, overrides, seed),
            SaveOnInterrupt(output_dir / "checkpoints" / "last.ckpt"),
            ConfusionMatrixPlot(output_dir / "confusion_matrix.png"),
            progress_bar(),
        ],
        logger=build_loggers(cfg.get("logger"), hydra_cfg.runtime.choices.get("logger"), output_dir),
        plugins=[AtomicCheckpointIO()],
    )

    fit_started = time.perf_counter()
    with ddp_ranks_run_this_job():
        try:
            trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
        except SystemExit as stop:  # how Lightning leaves after Ctrl-C or SIGTERM; SaveOnInterrupt has saved
            if trainer.is_global_zero:
                record.update(status="interrupted", wall_time_s=time.perf_counter() - started)
                write_record(output_dir, record)
            raise SystemExit(143 if isinstance(stop, SIGTERMException) else 130) from stop
        fit_seconds = time.perf_counter() - fit_started
        if trainer.is_global_zero:
            save_learning_curve(history.epochs, output_dir / "learning_curve.png")
        best = checkpoint.best_model_path or None  # None under fast_dev_run, which saves nothing
        test_metrics = trainer.test(task, datamodule=datamodule, ckpt_path=best, weights_only=True)[0]

    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    metrics.update(test_metrics)
    if checkpoint.best_model_score is not None:
        metrics["val/acc_best"] = float(checkpoint.best_model_score)
    metrics["fit_seconds"] = fit_seconds
    if trainer.is_global_zero:
        record.update(
            status="completed",
            params=sum(p.numel() for p in task.parameters()),
            epochs=trainer.current_epoch,
            metrics=metrics,
            wall_time_s=time.perf_counter() - started,
        )
        write_record(output_dir, record)
        print(f"test accuracy: {metrics['test/acc']:.4f} ({best or 'last weights'}; fit took {fit_seconds:.0f} s)")
    return metrics


# What Lightning's DDP launcher sets in the process that starts the other ranks.
DDP_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def ddp_ranks_run_this_job() -> Iterator[None]:
    """Make Lightning's DDP launcher start the other ranks on this job alone, in its directory.

    The launcher starts rank 1.. by re-running `sys.argv` (as `python -m <__main__'s module>`
    when there is one) with `hydra.run.dir=` Hydra's run dir. In a multirun, `sys.argv` is the
    whole sweep and the run dir is not the job's folder, so each rank would start the sweep again
    elsewhere; in a joblib or submitit worker, `__main__` is the worker's own module. The launcher
    also leaves its variables and process group behind, and the next job in this process would
    wait forever for ranks that have exited. A single run needs none of this.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import read_write

    import __main__

    hydra_cfg = HydraConfig.get()
    # LOCAL_RANK set: a rank that a launcher started (Lightning's own, torchrun), not a job.
    if hydra_cfg.mode != RunMode.MULTIRUN or "LOCAL_RANK" in os.environ:
        yield
        return
    argv, spec = sys.argv, __main__.__spec__
    sys.argv = [str(PROJECT_DIR / "train.py"), *hydra_cfg.overrides.task]
    __main__.__spec__ = None
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv, __main__.__spec__ = argv, spec
        import torch.distributed

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name in DDP_LAUNCH_ENV:
            os.environ.pop(name, None)


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except Exception as err:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode != RunMode.MULTIRUN:  # a sweep records the failed job and goes on
            exit_on_config_error(err)
        raise
    return metrics.get("val/acc_best")


if __name__ == "__main__":
    try:
        # Hydra would reject an unknown option too, but with exit code 1 and without the options.
        if os.environ.get("HYDRA_FULL_ERROR") != "1":
            check_group_choices(sys.argv[1:], CONFIG_DIR)
        sys.argv[1:] = resume_overrides(group_overrides(sys.argv[1:]))
    except ConfigError as err:
        exit_on_config_error(err)
        raise
    main()
