"""A run's `run.json` and `config_tree.txt`, and a sweep's summary after each job (mnist_extras/sweeps.py).
No torch here: Hydra builds `RunRecord` before any job."""

import atexit
import csv
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree

from mnist_extras.errors import ConfigError, exit_on_error, failure, override_key, user_error

RECORD = "run.json"


def read_record(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    # Written aside, then renamed: a reader never sees half a record.
    path = Path(run_dir) / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{RECORD}.{os.getpid()}")
    try:
        partial.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def safely(what: str | Path, write: Callable[..., Any], *args: Any) -> None:
    try:
        write(*args)
    except OSError as err:  # a full disk: the run or sweep goes on, or ends, with its own error on the terminal
        logging.getLogger(__name__).warning("could not write %s: %s", what, err)


def mark_interrupted(run_dir: Path, message: str) -> None:
    # Lightning turns Ctrl-C and SIGTERM into SystemExit; RunRecord.on_job_end, which Hydra calls after it, keeps this.
    if (record := read_record(run_dir)) is not None:
        write_record(run_dir, {**record, "status": "interrupted", "error": message})


def typed_overrides(config: DictConfig) -> list[str]:
    # As typed, `${hydra:job.num}` and all (the ListConfig's items would be resolved): a sweep run again compares them.
    return OmegaConf.to_container(config.hydra.overrides.task, resolve=False)


def record_failure(run_dir: Path, overrides: list[str], error: str, started: float | None) -> None:
    """Record a job that ended without recording its end (stopped before its run began, or killed)."""
    record = read_record(run_dir) or {"overrides": overrides}
    if record.get("status") not in (None, "running"):
        return
    record.update(status="failed", error=error)
    if started is not None:
        record.setdefault("wall_time_s", time.time() - started)
    write_record(run_dir, record)


def rank_zero() -> bool:
    # Lightning's rule (rank_zero_only.rank), read without importing torch.
    keys = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
    return int(next((os.environ[key] for key in keys if key in os.environ), 0)) == 0


def csv_metrics(path: Path) -> tuple[dict[str, float], int | None]:
    # The last value of each column of a Lightning metrics.csv, and the epochs it covers.
    with path.open(newline="") as f:
        rows = [{name: float(value) for name, value in row.items() if value} for row in csv.DictReader(f)]
    # The test's row carries the epoch count after fit, not an epoch that trained.
    epochs = [int(row["epoch"]) + 1 for row in rows if "epoch" in row and not any(n.startswith("test/") for n in row)]
    metrics = {name: value for row in rows for name, value in row.items() if name not in ("epoch", "step")}
    return metrics, max(epochs, default=None)


class RunRecord(Callback):
    """Writes `run.json` (running, then completed or failed; checkpoints.py marks it interrupted) and `config_tree.txt`,
    holding `.run.lock`: on rank zero only, as the other DDP ranks re-run the command into the same folder. A sweep's
    summary files are rewritten after every job and printed at exit: Hydra skips `on_multirun_end` after a failure."""

    def __init__(self) -> None:
        self.lock, self.run_dir, self.record = None, None, {}
        self.started = self.earlier_wall_time = 0.0
        self.sweep_dir, self.pid = None, 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.pid = os.getpid()  # joblib and submitit run the job hooks in their workers too: they skip the summary
        atexit.register(print_sweep_summary, self.sweep_dir, self.pid)  # not self: it may hold a lock

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Locked before Hydra writes .hydra/ and the log in it; None: a folder named at runtime, locked in on_job_start.
        run_dir = OmegaConf.select(config, "hydra.run.dir", throw_on_resolution_failure=False)
        if run_dir is not None and rank_zero():
            self.hold(Path(str(run_dir)).absolute())

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        overrides = typed_overrides(config)  # in each process's log file: DDP ranks must agree
        logging.getLogger("logfile").info("seed %s, overrides %s", config.get("seed", 0), " ".join(overrides))
        if not rank_zero():
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        self.hold(run_dir)  # an in-process sweep's jobs come here first
        self.run_dir, self.started = run_dir, time.time()
        ckpt_path = config.get("ckpt_path")
        # Only a run that continues a checkpoint of its own folder (Lightning's `last` is one) extends its record.
        own = str(ckpt_path) == "last" or Path(str(ckpt_path)).absolute().is_relative_to(run_dir.absolute())
        self.record = (read_record(run_dir) if ckpt_path and own else None) or {}
        self.earlier_wall_time = self.record.get("wall_time_s", 0.0)
        self.record.pop("error", None)
        given = [o for o in overrides if override_key(o) != "ckpt_path"]  # the checkpoint is no setting
        self.record.update(status="running", overrides=given, seed=config.get("seed", 0))
        if ckpt_path:
            self.record["resumed_from"] = [*self.record.get("resumed_from", []), str(ckpt_path)]
        self.write()
        print_config(config, run_dir)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.runtime.output_dir)
        started = self.started if run_dir == self.run_dir else None  # None: another rank's job, or one stopped early
        if started is not None:
            self.finish(job_return)
            self.release()
        if self.sweep_dir is not None and os.getpid() == self.pid:
            from mnist_extras.sweeps import write_summary  # sweeps.py imports this module

            if job_return.status == JobStatus.FAILED:  # stopped before its run began, or killed: no record of its end
                error = failure_line(job_return)
                safely(run_dir / RECORD, record_failure, run_dir, typed_overrides(config), error, started)
            safely("the sweep summary", write_summary, self.sweep_dir)

    def finish(self, job_return: JobReturn) -> None:
        stored = read_record(self.run_dir) or {}
        if stored.get("status") == "interrupted":  # mark_interrupted's record of a SystemExit
            return
        self.record = {**stored, **self.record}  # keys Lightning callbacks added
        csv_file = self.run_dir / "metrics.csv"
        # fast_dev_run writes no metrics.csv: one left by an earlier run is not this run's.
        fresh = csv_file.is_file() and csv_file.stat().st_mtime >= self.started
        metrics, epochs = csv_metrics(csv_file) if fresh else ({}, None)
        if job_return.status == JobStatus.COMPLETED:
            returned = job_return.return_value  # the run's metrics, or a search's objective
            if isinstance(returned, dict):
                metrics.update(returned)
            elif isinstance(returned, int | float):
                metrics["objective"] = float(returned)
            self.record["status"] = "completed"
        else:
            self.record.update(status="failed", error=failure_line(job_return))
        if metrics:
            self.record["metrics"] = {**self.record.get("metrics", {}), **metrics}
        if epochs is not None:
            self.record["epochs"] = epochs
        self.write()

    def hold(self, run_dir: Path) -> None:  # a second command into a folder in use stops in one line
        if self.lock is not None and Path(self.lock.lock_file).parent == run_dir:
            return
        self.release()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(run_dir / ".run.lock", timeout=0)
        try:
            self.lock.acquire()
        except Timeout:
            fix = "fix: wait for it, or pick another hydra.run.dir"
            exit_on_error(ConfigError(f"hydra.run.dir={run_dir}: a run is using this folder now; {fix}"))

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def write(self) -> None:
        self.record["wall_time_s"] = self.earlier_wall_time + time.time() - self.started
        safely(self.run_dir / RECORD, write_record, self.run_dir, self.record)


def print_sweep_summary(sweep_dir: Path, pid: int) -> None:
    from mnist_extras.sweeps import print_summary, write_summary  # sweeps.py imports this module

    if sweep_dir.is_dir() and os.getpid() == pid:
        safely("the sweep summary", lambda: print_summary(write_summary(sweep_dir), sweep_dir))


def failure_line(job_return: JobReturn) -> str:
    """A failed job's user-error line, or `Type: first line` of what it raised."""
    if (err := failure(job_return)) is None:
        return "the job failed"
    text = str(err).strip()
    return user_error(err) or f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def print_config(cfg: DictConfig, run_dir: Path) -> None:
    """Print the composed config once as a tree and keep the same text as `config_tree.txt`."""
    tree = Tree("config", guide_style="dim")
    for key, node in cfg.items():
        if key != "hydra":
            text = OmegaConf.to_yaml(node, resolve=True) if OmegaConf.is_config(node) else str(node)
            tree.add(str(key), style="bold").add(Syntax(text.rstrip(), "yaml", theme="ansi_dark"))
    Console().print(tree)
    with (Path(run_dir) / "config_tree.txt").open("w") as f:
        Console(file=f, width=120, color_system=None).print(tree)
