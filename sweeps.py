"""Run records and sweep summaries, light enough for Hydra to load before any job.

Each run writes `run.json` (its overrides, seed, size, metrics and status) in its folder; a
sweep's `summary.md`, `summary.csv` and `comparison.png` are built from its jobs' `run.json`.
Hydra builds `SweepReport` (config.yaml's `hydra.callbacks`) before it validates or runs
anything, so this module imports neither torch nor Lightning: a typo must fail in a second.
"""

import atexit
import csv
import json
import os
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

RECORD = "run.json"
SUMMARY_COLUMNS = [
    "job",
    "overrides",
    "params",
    "best val acc",
    "test acc",
    "epochs",
    "wall time (s)",
    "status",
    "error",
]


def read_record(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Replace `run.json` in one step, so a reader never sees half a record."""
    path = Path(run_dir) / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{RECORD}.{os.getpid()}")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, path)


def summary_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder of a sweep, in job order; a job that never recorded an end is 'interrupted'."""
    jobs = sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    rows = []
    for job in jobs:
        record = read_record(job) or {}
        metrics = record.get("metrics", {})
        status = record.get("status", "interrupted")
        rows.append(
            {
                "job": int(job.name),
                "overrides": " ".join(record.get("overrides", [])),
                "params": record.get("params", ""),
                "best val acc": _rounded(metrics.get("val/acc_best")),
                "test acc": _rounded(metrics.get("test/acc")),
                "epochs": record.get("epochs", ""),
                "wall time (s)": _rounded(record.get("wall_time_s"), 1),
                "status": "interrupted" if status == "running" else status,
                "error": record.get("error", ""),
            }
        )
    return rows


def _rounded(value: float | None, digits: int = 4) -> float | str:
    return "" if value is None else round(float(value), digits)


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write summary.csv, summary.md and comparison.png into the sweep folder; return the rows."""
    sweep_dir = Path(sweep_dir)
    rows = summary_rows(sweep_dir)
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    for row in rows:
        cells = (str(row[c]).replace("|", "\\|").replace("\n", " ") for c in SUMMARY_COLUMNS)
        lines.append("| " + " | ".join(cells) + " |")
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    save_comparison(rows, sweep_dir / "comparison.png")
    return rows


def save_comparison(rows: list[dict[str, Any]], path: Path) -> None:
    """Bars of best validation and test accuracy, one pair per job."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4.5))
    width = 0.4
    for offset, column in ((-width / 2, "best val acc"), (width / 2, "test acc")):
        heights = [row[column] if row[column] != "" else 0 for row in rows]
        ax.bar([i + offset for i in range(len(rows))], heights, width, label=column)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{row['job']}: {row['overrides'] or '(defaults)'}\n{row['status']}" for row in rows])
    ax.tick_params(axis="x", labelrotation=20, labelsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("Sweep: accuracy per job")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def print_summary(rows: list[dict[str, Any]], sweep_dir: Path) -> None:
    table = Table(title=f"Sweep summary ({sweep_dir}/summary.md)")
    for column in SUMMARY_COLUMNS:
        table.add_column(column, overflow="fold")
    styles = {"completed": "green", "failed": "red", "interrupted": "yellow"}
    for row in rows:
        table.add_row(*(str(row[c]) for c in SUMMARY_COLUMNS), style=styles.get(row["status"]))
    Console().print(table)


class SweepReport(HydraCallback):
    """Keeps a sweep's summary current after every job and prints it when the sweep ends.

    Hydra skips `on_multirun_end` when a job failed (it re-raises the job's error first), so the
    table is printed at exit instead; summary files are rewritten after each job, so they hold
    every job that ran even if the sweep is killed.
    """

    def __init__(self) -> None:
        self.started = 0.0
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        atexit.register(self._report)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.sweep_dir is None:  # a single run: nothing to summarise
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value
            write_record(
                run_dir,
                {
                    **(read_record(run_dir) or {}),
                    "overrides": list(config.hydra.overrides.task),
                    "status": "failed",
                    "error": f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}",
                    "wall_time_s": time.perf_counter() - self.started,
                },
            )
        write_summary(self.sweep_dir)

    def _report(self) -> None:
        if self.sweep_dir is not None and self.sweep_dir.is_dir():
            print_summary(write_summary(self.sweep_dir), self.sweep_dir)
