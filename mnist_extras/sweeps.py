"""Sweep summaries, light enough for Hydra to load before any job.

Each run writes `run.json` (records.py: its overrides, seed, metrics and status) in its folder; a
sweep's `summary.md`, `summary.csv`, `summary_by_config.csv` and `comparison.png` are built from
its jobs' `run.json`. Hydra builds `SweepReport` (config.yaml's `hydra.callbacks`) before it
validates or runs anything, so this module imports neither torch nor Lightning: a typo must fail
in a second.

`python -m mnist_extras.sweeps PATH [PATH ...]` builds the same tables for any runs: single run folders, sweep
folders, or folders above them.
"""

import argparse
import atexit
import contextlib
import csv
import io
import logging
import os
import statistics
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mnist_extras.records import RECORD, read_record, write_record

# "overrides" holds only the overrides that differ between the jobs; the others are in
# "common overrides", printed once above each table.
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
CONFIG_COLUMNS = [
    "config",
    "seeds",
    "best val acc mean",
    "best val acc std",
    "test acc mean",
    "test acc std",
    "wall time mean (s)",
    "note",
]
ACCURACIES = ("best val acc", "test acc")
STYLES = {"completed": "green", "failed": "red", "interrupted": "yellow"}


def summary_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder of a sweep, in job order; a job that never recorded an end is 'interrupted'."""
    jobs = sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    return rows_for([(int(job.name), read_record(job) or {}) for job in jobs])


def rows_for(runs: list[tuple[int | str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """A row per (label, record); the overrides every run shares go to "common overrides"."""
    # A job that died before writing run.json has no overrides to compare.
    known = [record["overrides"] for _, record in runs if "overrides" in record]
    common = [o for o in known[0] if all(o in other for other in known)] if known else []
    rows = []
    for job, record in runs:
        metrics = record.get("metrics", {})
        status = record.get("status", "interrupted")
        varying = [o for o in record.get("overrides", []) if o not in common]
        rows.append(
            {
                "job": job,
                "overrides": " ".join(varying),
                "params": record.get("params", ""),
                "best val acc": _rounded(metrics.get("val/acc_best")),
                "test acc": _rounded(metrics.get("test/acc")),
                "epochs": record.get("epochs", ""),
                "wall time (s)": _rounded(record.get("wall_time_s"), 1),
                "status": "interrupted" if status == "running" else status,
                "error": record.get("error", ""),
                "common overrides": " ".join(common),
                # The jobs that differ only in their seed share a config.
                "config": " ".join(o for o in varying if not _is_seed(o)) if "overrides" in record else "(no run.json)",
            }
        )
    return rows


def _is_seed(override: str) -> bool:
    # `+seed=3`, `++seed=3` and `seed=3` are one key.
    return override.split("=", 1)[0].lstrip("+~") == "seed"


def _rounded(value: float | None, digits: int = 4) -> float | str:
    return "" if value is None else round(float(value), digits)


def config_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration (the overrides less `seed=`), or none when no job sets another seed."""
    if not any(_is_seed(override) for row in rows for override in row["overrides"].split()):
        return []  # the seed is the same for all (then it is a common override) or never set
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["config"], []).append(row)
    return [_config_row(config, jobs) for config, jobs in groups.items()]


def _config_row(config: str, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    # Means are over the completed seeds only; the note says so whenever a seed did not complete.
    done = [job for job in jobs if job["status"] == "completed"]
    missing = Counter(job["status"] for job in jobs if job["status"] != "completed")
    note = ", ".join(f"{count} of {len(jobs)} {status}" for status, count in missing.items())
    if note and done:
        note += f": means of {len(done)}"
    return {
        "config": config or "(common)",
        "seeds": len(jobs),
        "best val acc mean": _mean(done, "best val acc"),
        "best val acc std": _std(done, "best val acc"),
        "test acc mean": _mean(done, "test acc"),
        "test acc std": _std(done, "test acc"),
        "wall time mean (s)": _mean(done, "wall time (s)", 1),
        "note": note,
        "common overrides": jobs[0]["common overrides"],
    }


def _mean(jobs: list[dict[str, Any]], column: str, digits: int = 4) -> float | str:
    values = [job[column] for job in jobs if job[column] != ""]
    return round(statistics.mean(values), digits) if values else ""


def _std(jobs: list[dict[str, Any]], column: str) -> float | str:
    values = [job[column] for job in jobs if job[column] != ""]
    return round(statistics.stdev(values), 4) if len(values) > 1 else ""


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write the summary files into the sweep folder; return the rows."""
    rows = summary_rows(sweep_dir)
    write_tables(rows, Path(sweep_dir))
    return rows


def write_tables(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """summary.csv, summary.md, comparison.png and, when seeds vary, summary_by_config.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = config_rows(rows)
    _write_csv(out_dir / "summary.csv", rows, SUMMARY_COLUMNS)
    if configs:
        _write_csv(out_dir / "summary_by_config.csv", configs, CONFIG_COLUMNS)
    else:  # a file left by an earlier summary of other runs would be read as this one's
        (out_dir / "summary_by_config.csv").unlink(missing_ok=True)
    common = rows[0]["common overrides"] if rows else ""
    lines = [f"common: {' '.join(f'`{o}`' for o in common.split())}", ""] if common else []
    lines += _markdown_table(rows, SUMMARY_COLUMNS)
    if configs:
        lines += ["", "## By configuration (mean and std over seeds)", ""] + _markdown_table(configs, CONFIG_COLUMNS)
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    save_comparison(rows, out_dir / "comparison.png")


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*columns, "common overrides"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = (str(row[c]).replace("|", "\\|").replace("\n", " ") for c in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def save_comparison(rows: list[dict[str, Any]], path: Path) -> None:
    """Bars of best validation and test accuracy: per configuration, mean with the std as error
    bar, when seeds vary; otherwise per job."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    configs = config_rows(rows)
    if configs:
        labels = _plot_labels([config["config"] for config in configs], [config["note"] for config in configs])
        series = [(c, [g[f"{c} mean"] for g in configs], [g[f"{c} std"] for g in configs]) for c in ACCURACIES]
        title = "Accuracy per configuration: mean and std over seeds"
    else:
        notes = ["" if row["status"] == "completed" else row["status"] for row in rows]
        labels = _plot_labels([row["overrides"] or str(row["job"]) for row in rows], notes)
        series = [(c, [row[c] for row in rows], []) for c in ACCURACIES]
        title = "Accuracy per job"
    # Labels stay horizontal, one override per line: each group is as wide as its longest line
    # (7-point characters are about 0.055 inch; the axes take 3/4 of the figure).
    longest = max((len(line) for label in labels for line in label.splitlines()), default=0)
    fig, ax = plt.subplots(figsize=(max(6.0, len(labels) * (0.055 * longest + 0.4) / 0.75), 4.5))
    width = 0.4
    for i, (column, heights, errors) in enumerate(series):
        x = [j + (i - 0.5) * width for j in range(len(labels))]
        yerr = _zeros(errors) if configs else None
        bars = ax.bar(x, _zeros(heights), width, yerr=yerr, capsize=3, label=column)
        ax.bar_label(bars, labels=[f"{h:.3f}" if h != "" else "" for h in heights], fontsize=6, padding=2)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    # Scaled to the data: runs at 98% and 99.5% must look different. Room above the bars for the legend.
    values = [h for _, heights, _ in series for h in heights if h != ""]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    pad = max(high - low, 0.01)
    ax.set_ylim(max(0.0, low - pad), high + pad)
    ax.set_ylabel("accuracy")
    common = rows[0]["common overrides"] if rows else ""
    if common:
        title += "\n" + textwrap.fill(f"common: {common}", width=int(fig.get_figwidth() * 14))
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper center", ncol=2, fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plot_labels(names: list[str], notes: list[str]) -> list[str]:
    """One override per line, keys cut to their last part (task.optimizer.lr=0.1 -> lr=0.1) unless
    that makes two labels the same."""
    full = [tuple(name.split()) for name in names]
    short = [tuple(_short_key(override) for override in name) for name in full]
    chosen = short if len(set(short)) == len(set(full)) else full
    return ["\n".join(lines + ((f"({note})",) if note else ())) for lines, note in zip(chosen, notes, strict=True)]


def _short_key(override: str) -> str:
    key, sep, value = override.partition("=")
    return key.replace("/", ".").rsplit(".", 1)[-1].lstrip("+") + sep + value if sep else override


def _zeros(values: list[float | str]) -> list[float]:
    return [0.0 if v == "" else v for v in values]


def print_summary(rows: list[dict[str, Any]], sweep_dir: Path, title: str = "Sweep summary") -> None:
    """The tables of write_tables; every text is a rich Text, so brackets in an error are not markup."""
    configs = config_rows(rows)
    tables = [_rich_table(rows, SUMMARY_COLUMNS, [STYLES.get(row["status"]) for row in rows])]
    if configs:
        tables.append(_rich_table(configs, CONFIG_COLUMNS, ["yellow" if g["note"] else None for g in configs]))
    # As wide as the widest table: at the console's width (80 columns in a pipe) rich would wrap
    # cells ('complet' / 'ed'). Colours only on a terminal, which Console decides by itself.
    console = Console(width=max(Console(width=100_000).measure(table).maximum for table in tables))
    console.print(Text(f"{title} ({Path(sweep_dir) / 'summary.md'})"), soft_wrap=True)
    common = rows[0]["common overrides"] if rows else ""
    if common:
        console.print(Text(f"common: {common}"), soft_wrap=True)
    console.print(tables[0])
    if configs:
        console.print(Text("By configuration (mean and std over seeds)"), soft_wrap=True)
        console.print(tables[1])


def _rich_table(rows: list[dict[str, Any]], columns: list[str], styles: list[str | None]) -> Table:
    table = Table()
    for column in columns:
        table.add_column(Text(column), no_wrap=True)
    for row, style in zip(rows, styles, strict=True):
        table.add_row(*(Text(str(row[c])) for c in columns), style=style)
    return table


class SweepReport(HydraCallback):
    """Keeps a sweep's summary current after every job and prints it when the sweep ends.

    Hydra skips `on_multirun_end` when a job failed (it re-raises the job's error first), so the
    table is printed at exit instead; summary files are rewritten after each job, so they hold
    every job that ran even if the sweep is killed.
    """

    def __init__(self) -> None:
        self.started = 0.0
        self.sweep_dir: Path | None = None
        self.pid = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.pid = os.getpid()  # joblib and submitit run the job hooks in their workers too: they skip them
        atexit.register(self._report)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.sweep_dir is None or os.getpid() != self.pid:  # a single run, or a launcher's worker
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        record = read_record(run_dir) or {}
        # The job's own RunRecord says how it ended; this records only a job that could not say it
        # (stopped before its run began, or killed while running).
        if job_return.status == JobStatus.FAILED and record.get("status") in (None, "running"):
            record.update(overrides=list(config.hydra.overrides.task), status="failed", error=failure_line(job_return))
            record.setdefault("wall_time_s", time.perf_counter() - self.started)
            self._write(lambda: write_record(run_dir, record))
        self._write(lambda: write_summary(self.sweep_dir))

    def _report(self) -> None:
        if self.sweep_dir is not None and self.sweep_dir.is_dir() and os.getpid() == self.pid:
            self._write(lambda: print_summary(write_summary(self.sweep_dir), self.sweep_dir))

    @staticmethod
    def _write(write: Any) -> None:
        """A full disk must not end the sweep: the jobs' own records are on disk already."""
        try:
            write()
        except OSError as err:
            logging.getLogger(__name__).warning("could not write the sweep summary: %s", err)


def failure_line(job_return: JobReturn) -> str:
    """`Type: first line` of a failed job's exception (Hydra's public getter raises it)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the getter also prints the job's overrides
            _ = job_return.return_value
    except BaseException as error:  # noqa: BLE001 - whatever the job raised is what it failed with
        text = str(error).strip()
        first_line = text.splitlines()[0] if text else ""
        if type(error).__name__ == "JobFailed":  # its message is the job's own error line
            return first_line
        return f"{type(error).__name__}: {first_line}"
    return "the job failed"


def find_runs(paths: list[Path]) -> list[Path]:
    """The folders holding a run.json at or below each path, in path order, job folders by number."""
    runs: dict[Path, None] = {}  # a set that keeps its order
    for path in paths:
        found = {record.parent for record in Path(path).rglob(RECORD)}
        # A sweep's job that died before writing run.json still counts, as 'interrupted'.
        found |= {job for run in found if run.name.isdigit() for job in run.parent.iterdir() if job.name.isdigit()}
        runs.update(dict.fromkeys(sorted(found, key=lambda p: [(int(s) if s.isdigit() else -1, s) for s in p.parts])))
    return [run for run in runs if run.is_dir()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_extras.sweeps",
        description="Compare runs: summary tables and a plot of every run.json at or below the given folders.",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="a run folder, a sweep folder or above")
    parser.add_argument(
        "--out", type=Path, default=Path("comparison"), help="where the files go (default: ./comparison)"
    )
    args = parser.parse_args(argv)
    runs = find_runs(args.paths)
    if not runs:
        print(f"error: no {RECORD} in or below {' '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    rows = rows_for([(str(run), read_record(run) or {}) for run in runs])
    write_tables(rows, args.out)
    print_summary(rows, args.out, title=f"Comparison of {len(rows)} runs")
    written = ["summary.md", "summary.csv", "summary_by_config.csv", "comparison.png"]
    print(f"wrote {', '.join(f for f in written if (args.out / f).is_file())} in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
