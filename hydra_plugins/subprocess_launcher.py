"""`hydra/launcher=subprocess`: each job of a sweep runs in turn as its own `python train.py <overrides>` process,
with Hydra's job number and id, so Lightning's DDP can start its other ranks by re-running the command, and a crash
cannot take the sweep down. A job whose `run.json` says `completed` is skipped; one that left `last.ckpt` resumes."""

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
from mnist_extras.records import read_record, record_failure, safely

log = logging.getLogger(__name__)
# The command line's `hydra.*` overrides that are the sweep's, not a job's (`hydra.sweep` covers `hydra.sweeper`).
SWEEP_ONLY = ("hydra.mode", "hydra.sweep", "hydra.launcher", "hydra.run", "hydra.job.num", "hydra.job.id")


class JobFailed(CompactHydraException):
    """A job ended without a completed run; Hydra prints a compact exception as its message alone."""


class SubprocessLauncher(Launcher):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from mnist_extras.sweeps import write_summary  # Hydra imports this module in every run, not only a sweep's

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        returns = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("#%d : %s", idx, " ".join(filter_overrides(overrides)))
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(config):
                config.hydra.job.id, config.hydra.job.num = str(idx), idx  # as BasicLauncher numbers its jobs
            job_dir = sweep_dir / str(config.hydra.sweep.subdir)
            ret = self.run_job(list(overrides), job_dir, idx, sweep_dir)
            ret.cfg, ret.hydra_cfg, ret.overrides, ret.working_dir = config, config, list(overrides), str(job_dir)
            returns.append(ret)
            # The jobs' Hydra callbacks run in their own processes: the sweep's RunRecord sees no job end.
            safely("the sweep summary", write_summary, sweep_dir)
        return returns

    def run_job(self, overrides: list[str], job_dir: Path, idx: int, sweep_dir: Path) -> JobReturn:
        before = read_record(job_dir)
        given = [o for o in overrides if override_key(o) != "ckpt_path"]
        if before is not None and before.get("overrides") != given:
            held = f"hydra.sweep.dir={sweep_dir} already holds job {idx} with overrides {before.get('overrides')}"
            fix = "fix: run the same sweep again, or pick a new hydra.sweep.dir"
            exit_on_error(ConfigError(f"{held}, not {given}; {fix}"))
        if before is not None and before.get("status") == "completed":
            log.info("job %d finished before (%s); skipping it", idx, job_dir / "run.json")
            return self.job_return(before)
        last = job_dir / "checkpoints" / "last.ckpt"
        # `ckpt_path` is not in config.yaml: `++` adds it, or replaces one the sweep gave.
        resume = [f"++ckpt_path={quoted(last)}"] if last.is_file() else []
        if resume:
            log.info("job %d continues from %s", idx, last)
        settings = [o for o in self.config.hydra.overrides.hydra if not str(override_key(o)).startswith(SWEEP_ONLY)]
        command = [sys.executable, sys.argv[0], *overrides, *resume, *settings]
        command += [f"hydra.run.dir={quoted(job_dir)}", f"hydra.sweep.dir={quoted(sweep_dir)}", "hydra.mode=RUN"]
        command += [f"hydra.job.num={idx}", f"hydra.job.id={idx}"]
        started = time.time()
        returncode, error_lines = run_teeing_stderr(command)
        if returncode == 2 and read_record(job_dir) == before:
            raise SystemExit(2)  # the job refused its config before any work, in the one line above
        if returncode != 0:  # recorded here if the process died without saying how (killed, or before its record)
            reason = next((line for line in reversed(error_lines) if line.strip()), f"exit code {returncode}")
            record_failure(job_dir, given, reason, started)
        return self.job_return(read_record(job_dir))

    def job_return(self, record: dict | None) -> JobReturn:
        """COMPLETED with the recorded objective (main's return value), or FAILED with JobFailed."""
        ret, record = JobReturn(), record or {}
        objective, name = record.get("metrics", {}).get("objective"), self.config.get("optimized_metric")
        if record.get("status") != "completed":
            reason = record.get("error") or "the job ended without a record"
        elif objective is None and "BasicSweeper" not in str(self.config.hydra.sweeper.get("_target_")):
            reason = f"the run logged no {name} to optimise (optimized_metric={name})"
        else:
            ret.status, ret.return_value = JobStatus.COMPLETED, objective
            return ret
        ret.status, ret.return_value = JobStatus.FAILED, JobFailed(reason)
        return ret


def run_teeing_stderr(command: list[str], keep: int = 20) -> tuple[int, list[str]]:
    """Run `command` with the terminal's stdout and stderr; return its exit code and last stderr lines."""
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
