"""A sweep's `summary.md`, `summary.csv`, `summary_by_config.csv` and `comparison.png`, from its jobs' `run.json`;
`python -m mnist_extras.sweeps PATH ...` builds them for any runs. No torch here: a sweep's own process imports it."""

import argparse
import csv
import re
import statistics
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from mnist_extras.errors import override_key
from mnist_extras.records import RECORD, read_record

# "overrides" holds those that differ between the jobs; the others are "common overrides", shown once.
SUMMARY_COLUMNS = ["job", "overrides", "params", "best val acc", "test acc", "epochs", "wall time (s)", "status"]
SUMMARY_COLUMNS += ["error"]
CONFIG_COLUMNS = ["config", "seeds", "best val acc mean", "best val acc std", "test acc mean", "test acc std"]
CONFIG_COLUMNS += ["wall time mean (s)", "note"]
BY_CONFIG = "By configuration (mean and std over seeds)"
ACCURACIES = ("best val acc", "test acc")
STYLES = {"completed": "green", "failed": "red", "interrupted": "yellow"}
Rows = list[dict[str, Any]]


def summary_rows(sweep_dir: Path) -> Rows:
    """One row per job folder, in job order; a job that never recorded an end is 'interrupted'."""
    jobs = sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    return rows_for([(int(job.name), read_record(job) or {}) for job in jobs])


def rows_for(runs: list[tuple[int | str, dict[str, Any]]]) -> Rows:
    # A job that died before writing run.json has no overrides to compare.
    known = [record["overrides"] for _, record in runs if "overrides" in record]
    common = [o for o in known[0] if all(o in other for other in known)] if known else []
    rows = []
    for job, record in runs:
        metrics, status = record.get("metrics", {}), record.get("status", "interrupted")
        varying = [o for o in record.get("overrides", []) if o not in common]
        # The jobs that differ only in their seed (`seed=3`, `+seed=3`, ...) share a config.
        config = " ".join(o for o in varying if override_key(o) != "seed") if "overrides" in record else "(no run.json)"
        rows.append(
            {
                "job": job,
                "overrides": " ".join(varying),
                "params": record.get("params", ""),
                "best val acc": rounded(metrics.get("val/acc_best")),
                "test acc": rounded(metrics.get("test/acc")),
                "epochs": record.get("epochs", ""),
                "wall time (s)": rounded(record.get("wall_time_s"), 1),
                "status": "interrupted" if status == "running" else status,
                "error": record.get("error", ""),
                "common overrides": " ".join(common),
                "config": config,
            }
        )
    return rows


def rounded(value: float | None, digits: int = 4) -> float | str:
    return "" if value is None else round(float(value), digits)


def config_rows(rows: Rows) -> Rows:
    # One row per configuration (the overrides less the seed), or none when no job sets another seed.
    # Means are over the completed seeds only; the note says so whenever a seed did not complete.
    if not any(override_key(o) == "seed" for row in rows for o in row["overrides"].split()):
        return []
    configs = []
    for config in dict.fromkeys(row["config"] for row in rows):
        jobs = [row for row in rows if row["config"] == config]
        done = [job for job in jobs if job["status"] == "completed"]
        missing = Counter(job["status"] for job in jobs if job["status"] != "completed")
        note = ", ".join(f"{count} of {len(jobs)} {status}" for status, count in missing.items())
        note += f": means of {len(done)}" if note and done else ""
        stats = [*mean_std(done, "best val acc"), *mean_std(done, "test acc"), mean_std(done, "wall time (s)", 1)[0]]
        row = dict(zip(CONFIG_COLUMNS, [config or "(common)", len(jobs), *stats, note], strict=True))
        configs.append({**row, "common overrides": jobs[0]["common overrides"]})
    return configs


def mean_std(jobs: Rows, column: str, digits: int = 4) -> tuple[float | str, float | str]:
    values = [job[column] for job in jobs if job[column] != ""]
    mean = round(statistics.mean(values), digits) if values else ""
    return mean, round(statistics.stdev(values), 4) if len(values) > 1 else ""


def write_summary(sweep_dir: Path) -> Rows:
    return write_tables(summary_rows(sweep_dir), Path(sweep_dir))


def write_tables(rows: Rows, out_dir: Path) -> Rows:
    out_dir.mkdir(parents=True, exist_ok=True)
    configs, common = config_rows(rows), rows[0]["common overrides"] if rows else ""
    lines = [f"common: {' '.join(f'`{o}`' for o in common.split())}", ""] if common else []
    lines += write_table(out_dir / "summary.csv", rows, SUMMARY_COLUMNS)
    if configs:
        lines += ["", f"## {BY_CONFIG}", "", *write_table(out_dir / "summary_by_config.csv", configs, CONFIG_COLUMNS)]
    else:  # a file left by an earlier summary of other runs would be read as this one's
        (out_dir / "summary_by_config.csv").unlink(missing_ok=True)
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    save_comparison(rows, configs, common, out_dir / "comparison.png")
    return rows


def write_table(path: Path, rows: Rows, columns: list[str]) -> list[str]:
    """Write the table to the csv file `path`, with the common overrides; return it as markdown lines."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*columns, "common overrides"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    cells = [columns, ["---"] * len(columns)]
    cells += [[str(row[c]).replace("|", "\\|").replace("\n", " ") for c in columns] for row in rows]
    return ["| " + " | ".join(line) + " |" for line in cells]


def save_comparison(rows: Rows, configs: Rows, common: str, path: Path) -> None:
    """Bars of the accuracies per configuration (mean, std as error bar) when seeds vary, otherwise per job."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no window, nothing to close

    items, suffix = (configs, " mean") if configs else (rows, "")
    names = [g["config"] for g in configs] if configs else [row["overrides"] or str(row["job"]) for row in rows]
    notes = [g["note"] for g in configs] if configs else [r["status"].replace("completed", "") for r in rows]
    labels = _plot_labels(names, notes)
    # Horizontal labels, one override per line: a group is as wide as its longest line (7-point characters).
    longest = max((len(line) for label in labels for line in label.splitlines()), default=0)
    fig = Figure(figsize=(max(6.0, len(labels) * (0.055 * longest + 0.4) / 0.75), 4.5))
    ax = fig.subplots()
    for i, column in enumerate(ACCURACIES):
        heights = [item[column + suffix] for item in items]  # "": no value
        yerr = [g[f"{column} std"] or 0.0 for g in configs] if configs else None
        x = [j + (i - 0.5) * 0.4 for j in range(len(labels))]
        bars = ax.bar(x, [h or 0.0 for h in heights], 0.4, yerr=yerr, capsize=3, label=column)
        ax.bar_label(bars, labels=[f"{h:.3f}" if h != "" else "" for h in heights], fontsize=6, padding=2)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    # Scaled to the data, so that runs at 98% and 99.5% look different; room above for the legend.
    values = [item[c + suffix] for item in items for c in ACCURACIES if item[c + suffix] != ""]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    pad = max(high - low, 0.01)
    ax.set_ylim(max(0.0, low - pad), high + pad)
    ax.set_ylabel("accuracy")
    title = "Accuracy per configuration: mean and std over seeds" if configs else "Accuracy per job"
    if common:
        title += "\n" + textwrap.fill(f"common: {common}", width=int(fig.get_figwidth() * 14))
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper center", ncol=2, fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def _plot_labels(names: list[str], notes: list[str]) -> list[str]:
    """One override per line, keys cut to their last part (++task.optimizer.lr=1 -> lr=1) unless two would match."""
    full = [tuple(name.split()) for name in names]
    short = [tuple(re.sub(r"^[^=]*[./+]", "", o) if "=" in o else o for o in name) for name in full]
    chosen = short if len(set(short)) == len(set(full)) else full
    return ["\n".join(lines + ((f"({note})",) if note else ())) for lines, note in zip(chosen, notes, strict=True)]


def print_summary(rows: Rows, sweep_dir: Path, title: str = "Sweep summary") -> None:
    """The tables of summary.md, as rich Text (brackets in an error are not markup), rows coloured by status."""
    configs, common = config_rows(rows), rows[0]["common overrides"] if rows else ""
    heading = f"{title} ({Path(sweep_dir) / 'summary.md'})" + (f"\ncommon: {common}" if common else "")
    sections = [(heading, rows, SUMMARY_COLUMNS)] + ([(BY_CONFIG, configs, CONFIG_COLUMNS)] if configs else [])
    tables = []
    for heading, items, columns in sections:
        table = Table(*columns)
        for item in items:  # a configuration has no status: yellow when a seed did not complete
            style = STYLES.get(item["status"]) if "status" in item else "yellow" if item["note"] else None
            table.add_row(*(Text(str(item[c])) for c in columns), style=style)
        tables.append((heading, table))
    # As wide as the widest table: in a pipe's 80 columns rich would wrap cells. Colours on a terminal only.
    console = Console(width=max(Console(width=100_000).measure(table).maximum for _, table in tables))
    for heading, table in tables:
        console.print(Text(heading), soft_wrap=True)
        console.print(table)


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
    parser = argparse.ArgumentParser(prog="python -m mnist_extras.sweeps", description="Compare runs.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="a run folder, a sweep folder or above")
    parser.add_argument("--out", type=Path, default=Path("comparison"), help="where the files go (./comparison)")
    args = parser.parse_args(argv)
    runs = find_runs(args.paths)
    if not runs:
        print(f"error: no {RECORD} in or below {' '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    rows = write_tables(rows_for([(str(run), read_record(run) or {}) for run in runs]), args.out)
    print_summary(rows, args.out, title=f"Comparison of {len(rows)} runs")
    written = ["summary.md", "summary.csv", "summary_by_config.csv", "comparison.png"]
    print(f"wrote {', '.join(f for f in written if (args.out / f).is_file())} in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
