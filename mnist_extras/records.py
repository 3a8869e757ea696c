"""What a run leaves to read: `run.json` in its folder, and the config tree it prints.

`RunRecord` is a Hydra callback (configs/hydra/callbacks/extras.yaml). `run.json` says `running`
from the start of the job, then `completed` with the metrics or `failed` with the error line;
Lightning's SaveOnInterrupt writes `interrupted` through `mark_interrupted`. Each run's record
describes that run alone: only a run that continues a checkpoint of its own folder extends it.
Two processes never share a folder: the job holds `<run dir>/.run.lock`, and a second command
into a folder in use stops in one line before it changes anything.

No torch or Lightning here: Hydra builds this callback before any job.
"""

import contextlib
import csv
import io
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

RECORD = "run.json"
LOCK = ".run.lock"
log = logging.getLogger(__name__)


def read_record(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Replace `run.json` in one step, so a reader never sees half a record."""
    path = Path(run_dir) / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{RECORD}.{os.getpid()}")
    try:
        partial.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def update_record(run_dir: Path, **changes: Any) -> None:
    """Change some fields of an existing `run.json` (for Lightning callbacks: they run inside the job)."""
    record = read_record(run_dir)
    if record is not None:
        write_record(run_dir, {**record, **changes})


def mark_interrupted(run_dir: Path, message: str) -> None:
    """Ctrl-C or SIGTERM: Lightning turns both into SystemExit, so Hydra calls no on_job_end."""
    update_record(run_dir, status="interrupted", error=message)


def rank_zero() -> bool:
    """Lightning's rule for the main process (pytorch_lightning.utilities.rank_zero_only.rank),
    read from the same variables without importing torch."""
    rank = next(
        (os.environ[key] for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK") if key in os.environ),
        "0",
    )
    return int(rank) == 0


def csv_metrics(path: Path) -> tuple[dict[str, float], int | None]:
    """The last logged value of each column of a Lightning metrics.csv, and the epochs it covers."""
    metrics: dict[str, float] = {}
    epochs = None
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            logged = {name: float(value) for name, value in row.items() if value not in ("", None)}
            epoch = logged.pop("epoch", None)
            logged.pop("step", None)
            # The test's row carries the epoch count after fit, not an epoch that trained.
            if epoch is not None and not any(name.startswith("test/") for name in logged):
                epochs = max(epochs or 0, int(epoch) + 1)
            metrics.update(logged)
    return metrics, epochs


class RunRecord(Callback):
    """Writes `<run dir>/run.json` and `config_tree.txt`; holds the folder's lock for the job.

    Only rank zero acts: the other DDP ranks re-run the same command into the same folder.
    """

    def __init__(self) -> None:
        self.lock: FileLock | None = None
        self.run_dir: Path | None = None
        self.record: dict[str, Any] = {}
        self.started = 0.0
        self.earlier_wall_time = 0.0

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # A single run locks its folder before Hydra writes .hydra/ and the log file into it.
        try:
            run_dir = Path(str(config.hydra.run.dir)).absolute()
        except Exception:  # noqa: BLE001 - a folder named after the job's runtime: on_job_start locks it
            return
        if rank_zero():
            self.hold(run_dir)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Each process's own log file (not the terminal) says what it trains: DDP ranks must agree.
        overrides = " ".join(config.hydra.overrides.task)
        logging.getLogger("logfile").info("seed %s, overrides %s", config.get("seed", 0), overrides)
        if not rank_zero():
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        self.hold(run_dir)  # the jobs of an in-process sweep (BasicLauncher) come here first
        self.run_dir, self.started = run_dir, time.time()
        ckpt_path = config.get("ckpt_path")
        earlier = read_record(run_dir) if continues_here(ckpt_path, run_dir) else None
        self.record = earlier or {}
        self.earlier_wall_time = self.record.get("wall_time_s", 0.0)
        self.record.update(
            status="running",
            overrides=[arg for arg in config.hydra.overrides.task if key_of(arg) != "ckpt_path"],
            seed=config.get("seed", 0),
            wall_time_s=self.earlier_wall_time,
        )
        self.record.pop("error", None)
        if ckpt_path:
            self.record["resumed_from"] = [*self.record.get("resumed_from", []), str(ckpt_path)]
        self.write()
        print_config(config, run_dir)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.run_dir is None or Path(config.hydra.runtime.output_dir) != self.run_dir:
            return  # another rank, or a job this process did not start
        metrics_file = self.run_dir / "metrics.csv"
        # Lightning writes no metrics.csv under fast_dev_run: one left by an earlier run is not this run's.
        if metrics_file.is_file() and metrics_file.stat().st_mtime >= self.started:
            metrics, epochs = csv_metrics(metrics_file)
            self.record["metrics"] = {**self.record.get("metrics", {}), **metrics}
            if epochs is not None:
                self.record["epochs"] = epochs
        if job_return.status == JobStatus.COMPLETED:
            returned = job_return.return_value  # main returns the run's metrics, or a search's objective
            if isinstance(returned, dict):  # fast_dev_run writes no metrics.csv: this is all there is
                self.record["metrics"] = {**self.record.get("metrics", {}), **returned}
            elif isinstance(returned, int | float):
                self.record.setdefault("metrics", {})["objective"] = float(returned)
            self.record["status"] = "completed"
        else:
            self.record.update(status="failed", error=error_line(failure(job_return)))
        self.write()
        self.release()

    def hold(self, run_dir: Path) -> None:
        if self.lock is not None and Path(self.lock.lock_file).parent == run_dir:
            return
        self.release()
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(run_dir / LOCK, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            print(
                f"error: hydra.run.dir={run_dir}: a run is using this folder now; "
                "fix: wait for it, or pick another hydra.run.dir",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(2) from None
        self.lock = lock

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def write(self) -> None:
        self.record["wall_time_s"] = self.earlier_wall_time + time.time() - self.started
        try:
            write_record(self.run_dir, self.record)
        except OSError as err:  # a full disk: the run goes on, or ends, with its error on the terminal
            log.warning("could not write %s: %s", self.run_dir / RECORD, err)


def continues_here(ckpt_path: Any, run_dir: Path) -> bool:
    """A run extends its folder's record only when it continues a checkpoint kept in that folder
    (Lightning's `last` is one of this run's own checkpoints)."""
    if not ckpt_path:
        return False
    return str(ckpt_path) == "last" or Path(str(ckpt_path)).absolute().is_relative_to(run_dir.absolute())


def key_of(arg: str) -> str:
    return arg.partition("=")[0].lstrip("+~").replace("/", ".")


def failure(job_return: JobReturn) -> BaseException:
    """A failed job's exception: Hydra's public getter raises it."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the getter also prints the overrides
            _ = job_return.return_value
    except BaseException as err:  # noqa: BLE001 - whatever the job raised is what it failed with
        return err
    return RuntimeError("the job failed")


def error_line(err: BaseException) -> str:
    try:
        from mnist_extras.errors import user_error
    except ImportError:
        user_error = None
    line = user_error(err) if user_error else None
    text = str(err).strip()
    return line or f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def config_tree(cfg: DictConfig) -> Any:
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    for key, node in cfg.items():
        if key == "hydra":
            continue
        text = OmegaConf.to_yaml(node, resolve=True) if OmegaConf.is_config(node) else str(node)
        tree.add(str(key), style="bold").add(Syntax(text.rstrip(), "yaml", theme="ansi_dark"))
    return tree


def print_config(cfg: DictConfig, run_dir: Path) -> None:
    """Print the composed config once as a tree and keep the same text as `config_tree.txt`."""
    from rich.console import Console

    tree = config_tree(cfg)
    Console().print(tree)
    with (Path(run_dir) / "config_tree.txt").open("w") as f:
        Console(file=f, width=120, color_system=None).print(tree)


class LibraryNoise(logging.Filter):
    """Drops library lines that say nothing about the user's run."""

    NOISE = ("💡 Tip:", "Trainer already configured with model summary")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


def quiet_libraries() -> None:
    """Silence what a user cannot act on, at its source: torch deprecates an API that Lightning
    calls, Lightning advertises a cloud logger when its trainer is built, and doubts its model size
    under mixed precision (where the weights stay 32-bit, so the size it gives is right)."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Precision .*-mixed is not supported by the model summary")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(LibraryNoise())
