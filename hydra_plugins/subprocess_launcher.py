"""A Hydra launcher (`hydra/launcher=subprocess`) that runs each job of a sweep as its own
`python train.py <overrides>` process, one after another, in its folder under hydra.sweep.dir.

A job is then a single run in every way: Lightning's DDP launcher starts its other ranks by
re-running that job's own command (an in-process sweep would re-run the whole sweep), a crashed
job cannot take the sweep down with it, and nothing one job leaves in the process reaches the
next. Each job gets Hydra's `hydra.job.num` and `hydra.job.id` as BasicLauncher gives them, and
its own process runs the job's Hydra callbacks (run.json, checks), as with any remote launcher.

The launcher also makes a sweep resumable: a job whose `run.json` says `completed` is not run
again (its recorded objective is returned), and a job that left `checkpoints/last.ckpt` continues
from it. For parallel jobs use hydra/launcher=joblib or a cluster launcher.
"""

import logging
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.errors import CompactHydraException
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from mnist_extras.errors import ConfigError, exit_on_error, override_key, quoted
from mnist_extras.records import read_record, write_record

log = logging.getLogger(__name__)


class JobFailed(CompactHydraException):
    """A job's process ended without a completed run; the message is its last error line. Hydra
    prints a compact exception as its message alone, so a sweep with a failed job ends in one line."""


class SubprocessLauncher(Launcher):
    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        returns = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("#%d : %s", idx, " ".join(filter_overrides(overrides)))
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(config):
                config.hydra.job.id = config.hydra.job.num = idx  # as BasicLauncher numbers its jobs
            job_dir = Path(str(sweep_dir), str(config.hydra.sweep.subdir))
            ret = self.run_job(list(overrides), job_dir, idx, sweep_dir)
            ret.cfg, ret.hydra_cfg, ret.overrides, ret.working_dir = config, config, list(overrides), str(job_dir)
            returns.append(ret)
            summarise(sweep_dir)
        return returns

    def run_job(self, overrides: list[str], job_dir: Path, idx: int, sweep_dir: Path) -> JobReturn:
        before = read_record(job_dir)
        given = [o for o in overrides if override_key(o) != "ckpt_path"]
        if before is not None and before.get("overrides") != given:
            err = ConfigError(
                f"hydra.sweep.dir={sweep_dir} already holds job {idx} with overrides {before.get('overrides')}, "
                f"not {given}; fix: run the same sweep again, or pick a new hydra.sweep.dir"
            )
            exit_on_error(err)
            raise err
        if before is not None and before.get("status") == "completed":
            log.info("job %d finished before (%s); skipping it", idx, job_dir / "run.json")
            return self.job_return(before)
        last = job_dir / "checkpoints" / "last.ckpt"
        # `ckpt_path` is not in config.yaml: `++` adds it, or replaces one the sweep gave.
        resume = [f"++ckpt_path={quoted(last)}"] if last.is_file() else []
        if resume:
            log.info("job %d continues from %s", idx, last)
        command = [sys.executable, sys.argv[0], *overrides, *resume, *self.hydra_settings()]
        command += [f"hydra.run.dir={quoted(job_dir)}", f"hydra.sweep.dir={quoted(sweep_dir)}", "hydra.mode=RUN"]
        command += [f"hydra.job.num={idx}", f"hydra.job.id={idx}"]
        started = time.time()
        returncode, error_lines = run_teeing_stderr(command)
        after = read_record(job_dir)
        if returncode == 2 and after == before:
            raise SystemExit(2)  # the job refused its config before any work, in the one line above
        if returncode != 0 and (after is None or after.get("status") == "running"):
            # The process died without saying how (killed, or a crash before its record began).
            reason = next((line for line in reversed(error_lines) if line.strip()), f"exit code {returncode}")
            after = {**(after or {"overrides": given}), "status": "failed", "error": reason}
            after.setdefault("wall_time_s", time.time() - started)
            write_record(job_dir, after)
        return self.job_return(after, error_lines)

    def hydra_settings(self) -> list[str]:
        """The command line's `hydra.*` overrides that shape a job (`hydra.job.env_set.*`,
        `hydra/job_logging=...`, `hydra.verbose`), less those that belong to the sweep itself."""
        sweep_only = (
            "hydra.mode",
            "hydra.sweep",
            "hydra.launcher",
            "hydra.sweeper",
            "hydra.run",
            "hydra.job.num",
            "hydra.job.id",
        )
        keys = [(arg, override_key(arg) or "") for arg in self.config.hydra.overrides.hydra]
        return [arg for arg, key in keys if not key.startswith(sweep_only)]

    def job_return(self, record: dict | None, error_lines: Sequence[str] = ()) -> JobReturn:
        """The job's outcome as Hydra's launchers give it: COMPLETED with main's return value (the
        recorded objective), or FAILED with the exception, through JobReturn's public setter."""
        ret = JobReturn()
        record = record or {}
        objective = record.get("metrics", {}).get("objective")
        needs_objective = "BasicSweeper" not in str(self.config.hydra.sweeper.get("_target_"))
        if record.get("status") != "completed":
            reason = record.get("error") or next((line for line in reversed(error_lines) if line.strip()), "")
            ret.status, ret.return_value = JobStatus.FAILED, JobFailed(reason or "the job ended without a record")
        elif objective is None and needs_objective:
            name = self.config.get("optimized_metric")
            reason = f"the run logged no {name} to optimise (optimized_metric={name})"
            ret.status, ret.return_value = JobStatus.FAILED, JobFailed(reason)
        else:
            ret.status, ret.return_value = JobStatus.COMPLETED, objective
        return ret


def summarise(sweep_dir: Path) -> None:
    """Keep the sweep's summary current after each job: its jobs' Hydra callbacks run in their own
    processes, so the sweep's SweepReport sees no job end."""
    from mnist_extras.sweeps import write_summary

    try:
        write_summary(sweep_dir)
    except OSError as err:  # a full disk must not end the sweep: the jobs' records are on disk already
        log.warning("could not write the sweep summary: %s", err)


def run_teeing_stderr(command: list[str], keep: int = 20) -> tuple[int, list[str]]:
    """Run `command` with the terminal's stdout; pass its stderr through; return its exit code and last lines."""
    lines: deque[str] = deque(maxlen=keep)
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace") as process:
        try:
            for line in process.stderr:
                sys.stderr.write(line)
                lines.append(line.rstrip("\n"))
            process.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the job too: let it save last.ckpt, then stop the sweep
            process.wait()
            raise SystemExit(130) from None
    return process.returncode, list(lines)
