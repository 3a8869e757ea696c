"""A Hydra launcher that runs each job of a sweep as its own `python train.py <overrides>` process.

A job is then a single run in every way: Lightning's DDP launcher starts its other ranks by
re-running that job's own command (in-process sweeps would re-run the whole sweep), a crashed or
killed job cannot take the sweep down with it, and nothing one job leaves in the process (a
process group, environment variables, random state) reaches the next.

The launcher also makes a sweep resumable: a job whose `run.json` says `completed` is not run
again (its recorded objective is returned), and a job that left `checkpoints/last.ckpt` continues
from it. Jobs run one after another; for parallel jobs use hydra/launcher=joblib or a cluster
launcher (README: "Sweeps in parallel and on clusters").
"""

import logging
import subprocess
import sys
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.errors import CompactHydraException
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from mnist_extras.errors import ConfigError, exit_on_error, override_key, quoted
from mnist_extras.sweeps import read_record

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
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        returns = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("#%d : %s", idx, " ".join(filter_overrides(overrides)))
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(config):
                config.hydra.job.id = config.hydra.job.num = idx
            job_dir = Path(config.hydra.sweep.dir, config.hydra.sweep.subdir).resolve()
            with open_dict(config):
                config.hydra.runtime.output_dir = str(job_dir)
            self.hydra_context.callbacks.on_job_start(config=config, task_function=self.task_function)
            ret = self.run_job(list(overrides), job_dir, idx)
            ret.cfg, ret.hydra_cfg, ret.overrides, ret.working_dir = config, config, list(overrides), str(job_dir)
            self.hydra_context.callbacks.on_job_end(config=config, job_return=ret)
            returns.append(ret)
        return returns

    def run_job(self, overrides: list[str], job_dir: Path, idx: int) -> JobReturn:
        record = read_record(job_dir)
        if record is not None and record.get("overrides") != [o for o in overrides if override_key(o) != "ckpt_path"]:
            err = ConfigError(
                f"hydra.sweep.dir={job_dir.parent} already holds job {idx} with overrides {record.get('overrides')}, "
                f"not {overrides}; fix: run the same sweep again, or pick a new hydra.sweep.dir"
            )
            exit_on_error(err)
            raise err
        if record is not None and record.get("status") == "completed":
            log.info("job %d finished before (%s); skipping it", idx, job_dir / "run.json")
            return self.job_return(record)
        last = job_dir / "checkpoints" / "last.ckpt"
        resume = [f"++ckpt_path={quoted(last)}"] if last.is_file() else []
        if resume:
            log.info("job %d continues from %s", idx, last)
        command = [sys.executable, sys.argv[0], *overrides, *resume, *self.hydra_settings()]
        command += [f"hydra.run.dir={quoted(job_dir)}", "hydra.mode=RUN"]
        error_lines = run_teeing_stderr(command)
        return self.job_return(read_record(job_dir), error_lines)

    def hydra_settings(self) -> list[str]:
        """The command line's `hydra.*` overrides that shape a job (`hydra.job.env_set.*`,
        `hydra/job_logging=...`, `hydra.verbose`), less those that belong to the sweep itself."""
        sweep_only = ("hydra.mode", "hydra.sweep", "hydra.launcher", "hydra.sweeper", "hydra.run", "hydra.callbacks")
        keys = [(arg, override_key(arg) or "") for arg in self.config.hydra.overrides.hydra]
        return [arg for arg, key in keys if not key.startswith(sweep_only)]

    def job_return(self, record: dict | None, error_lines: Sequence[str] = ()) -> JobReturn:
        ret = JobReturn(status=JobStatus.COMPLETED)
        record = record or {}
        objective = record.get("metrics", {}).get("objective")
        needs_objective = "BasicSweeper" not in str(self.config.hydra.sweeper.get("_target_"))
        if record.get("status") != "completed":
            reason = record.get("error") or next((line for line in reversed(error_lines) if line.strip()), "")
            ret.status, ret._return_value = JobStatus.FAILED, JobFailed(reason or "the job ended without a record")
        elif objective is None and needs_objective:
            reason = "no validation ran, so there is no val/acc to optimise"
            ret.status, ret._return_value = JobStatus.FAILED, JobFailed(reason)
        else:
            ret.return_value = objective
        return ret


def run_teeing_stderr(command: list[str], keep: int = 20) -> list[str]:
    """Run `command` with the terminal's stdout; pass its stderr through and return the last lines."""
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
    return list(lines)
