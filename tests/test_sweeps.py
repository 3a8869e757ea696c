"""Sweep summaries and `python -m mnist_extras.sweeps`, from hand-written run.json files: no training."""

import csv
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus
from matplotlib.axes import Axes
from omegaconf import OmegaConf

from mnist_extras import records, sweeps
from mnist_extras.records import RunRecord, write_record
from mnist_extras.sweeps import SUMMARY_COLUMNS, main, print_summary, summary_rows, write_summary

PROJECT_DIR = Path(__file__).resolve().parents[1]
COMMON = ["trainer=cpu", "+trainer.limit_train_batches=3"]


def record(*overrides: str, status: str = "completed", val: float = 0.98, test: float = 0.97, **extra) -> dict:
    done = {"params": 10, "epochs": 2, "metrics": {"val/acc_best": val, "test/acc": test, "fit_seconds": 1.0}}
    return {
        "overrides": [*COMMON, *overrides],
        "status": status,
        "wall_time_s": 10.0,
        **(done if status == "completed" else {}),
        **extra,
    }


def make_sweep(sweep_dir: Path, records: list[dict]) -> Path:
    for job, run in enumerate(records):
        write_record(sweep_dir / str(job), run)
    return sweep_dir


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(autouse=True)
def no_forced_colour(monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)


def test_brackets_in_an_error_or_override_print_literally(tmp_path, capsys):
    error = "OSError: [Errno 2] no such file [/tmp/x] in [bold]run[/bold]"
    sweep = make_sweep(
        tmp_path,
        [record("task.optimizer.lr=0.1"), record("task.layers=[1,2]", status="failed", error=error)],
    )

    print_summary(write_summary(sweep), sweep)

    out = capsys.readouterr().out
    assert error in out
    assert "task.layers=[1,2]" in out


def test_the_sweep_callback_records_a_failed_job_and_prints_its_error_literally(tmp_path, capsys, monkeypatch):
    at_exit = []
    monkeypatch.setattr(records.atexit, "register", lambda *call: at_exit.append(call))  # the test calls it
    config = OmegaConf.create(
        {
            "hydra": {
                "sweep": {"dir": str(tmp_path)},
                "runtime": {"output_dir": str(tmp_path / "0")},
                "overrides": {"task": ["task.optimizer.lr=0.1"]},
            }
        }
    )
    callback = RunRecord()
    callback.on_multirun_start(config)  # the job's own hooks ran in its process: this one sees only its end

    failure = FileNotFoundError("[/tmp/x] is [bold]missing")
    ret = JobReturn()
    ret.status, ret.return_value = JobStatus.FAILED, failure
    callback.on_job_end(config, ret)
    [(report, *args)] = at_exit
    report(*args)

    assert "FileNotFoundError: [/tmp/x] is [bold]missing" in capsys.readouterr().out
    assert [row["status"] for row in read_csv(tmp_path / "summary.csv")] == ["failed"]
    assert records.read_record(tmp_path / "0")["overrides"] == ["task.optimizer.lr=0.1"]


def test_the_printed_table_is_as_wide_as_its_cells_and_plain_in_a_pipe(tmp_path, capsys):
    long_dir = "data_module.data_dir=/" + "/".join(["a-rather-long-folder-name"] * 6)
    sweep = make_sweep(tmp_path, [record(long_dir), record("data_module.data_dir=/x", status="running")])

    print_summary(write_summary(sweep), sweep)

    out = capsys.readouterr().out
    assert "\x1b[" not in out  # no colour codes outside a terminal
    line = next(line for line in out.splitlines() if long_dir in line)
    assert "completed" in line  # the whole row on one line
    assert "interrupted" in out


def test_common_overrides_are_shown_once_and_the_varying_ones_in_the_table(tmp_path, capsys):
    sweep = make_sweep(tmp_path, [record(f"task.optimizer.lr={lr}", "seed=1") for lr in (0.1, 0.01, 0.001)])

    rows = write_summary(sweep)
    print_summary(rows, sweep)

    assert summary_rows(sweep) == rows
    assert set(SUMMARY_COLUMNS) <= set(rows[0])
    assert [row["overrides"] for row in rows] == [f"task.optimizer.lr={lr}" for lr in (0.1, 0.01, 0.001)]
    md = (sweep / "summary.md").read_text().splitlines()
    assert md[0] == "common: `trainer=cpu` `+trainer.limit_train_batches=3` `seed=1`"
    assert "trainer=cpu" not in "\n".join(md[1:])
    summary = read_csv(sweep / "summary.csv")
    assert [row["overrides"] for row in summary] == [row["overrides"] for row in rows]
    assert {row["common overrides"] for row in summary} == {"trainer=cpu +trainer.limit_train_batches=3 seed=1"}
    out = capsys.readouterr().out
    assert out.count("trainer=cpu") == 1
    assert "common: trainer=cpu +trainer.limit_train_batches=3 seed=1" in out
    assert not (sweep / "summary_by_config.csv").exists()  # one seed: nothing to aggregate
    assert "By configuration" not in out


def test_no_common_line_when_the_jobs_share_no_override(tmp_path):
    write_record(tmp_path / "0", {"overrides": ["a=1"], "status": "completed"})
    write_record(tmp_path / "1", {"overrides": ["b=2"], "status": "completed"})

    rows = write_summary(tmp_path)

    assert [row["overrides"] for row in rows] == ["a=1", "b=2"]
    assert (tmp_path / "summary.md").read_text().startswith("| job |")


def test_seeds_are_aggregated_per_configuration_and_a_failed_seed_is_named(tmp_path, capsys):
    accuracies = {"0.1": [(0.95, 0.94), (0.97, 0.95), (0.96, 0.99)], "0.01": [(0.98, 0.97), (0.99, 0.985)]}
    records = [
        record(f"task.optimizer.lr={lr}", f"++seed={seed}", val=val, test=test, wall_time_s=10.0 * seed)
        for lr, pairs in accuracies.items()
        for seed, (val, test) in enumerate(pairs, start=1)
    ]
    records.append(record("task.optimizer.lr=0.01", "++seed=3", status="failed", error="RuntimeError: boom"))
    sweep = make_sweep(tmp_path, records)

    print_summary(write_summary(sweep), sweep)

    by_config = read_csv(sweep / "summary_by_config.csv")
    assert [row["config"] for row in by_config] == ["task.optimizer.lr=0.1", "task.optimizer.lr=0.01"]
    for row, pairs in zip(by_config, accuracies.values(), strict=True):
        vals, tests = zip(*pairs, strict=True)
        assert float(row["best val acc mean"]) == pytest.approx(statistics.mean(vals), abs=1e-4)
        assert float(row["best val acc std"]) == pytest.approx(statistics.stdev(vals), abs=1e-4)
        assert float(row["test acc mean"]) == pytest.approx(statistics.mean(tests), abs=1e-4)
        assert float(row["test acc std"]) == pytest.approx(statistics.stdev(tests), abs=1e-4)
        assert float(row["wall time mean (s)"]) == pytest.approx(statistics.mean(range(10, 10 * len(pairs) + 1, 10)))
    assert [row["seeds"] for row in by_config] == ["3", "3"]
    assert by_config[0]["note"] == ""
    assert by_config[1]["note"] == "1 of 3 failed: means of 2"
    assert by_config[1]["common overrides"] == "trainer=cpu +trainer.limit_train_batches=3"
    md = (sweep / "summary.md").read_text()
    assert "## By configuration" in md
    assert "| task.optimizer.lr=0.01 | 3 |" in md
    out = capsys.readouterr().out
    assert "By configuration" in out
    assert "1 of 3 failed" in out


def test_a_configuration_without_a_completed_seed_has_no_means(tmp_path):
    sweep = make_sweep(
        tmp_path,
        [
            record("lr=1", "seed=1"),
            record("lr=1", "seed=2"),
            record("lr=2", "seed=1", status="running"),
            record("lr=2", "seed=2", status="interrupted"),
        ],
    )

    write_summary(sweep)

    by_config = read_csv(sweep / "summary_by_config.csv")
    assert by_config[1]["note"] == "2 of 2 interrupted"
    assert by_config[1]["best val acc mean"] == ""
    assert by_config[0]["best val acc std"] == "0.0"


def test_when_only_the_seed_varies_the_configuration_is_the_common_one(tmp_path):
    sweep = make_sweep(tmp_path, [record("seed=1", val=0.9), record("seed=2", val=0.8)])

    write_summary(sweep)

    (row,) = read_csv(sweep / "summary_by_config.csv")
    assert row["config"] == "(common)"
    assert float(row["best val acc mean"]) == pytest.approx(0.85)


def test_the_plot_draws_error_bars_only_for_seeds(tmp_path, monkeypatch):
    drawn = []
    bar = Axes.bar

    def spy(self, x, height, *args, **kwargs):
        drawn.append((list(height), kwargs.get("yerr")))
        return bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(Axes, "bar", spy)
    seeds = make_sweep(tmp_path / "seeds", [record("seed=1", val=0.9), record("seed=2", val=0.8)])
    jobs = make_sweep(tmp_path / "jobs", [record("lr=1", val=0.9), record("lr=2", val=0.8)])

    write_summary(seeds)
    write_summary(jobs)

    seed_val, jobs_val = drawn[0::2]
    assert seed_val == ([pytest.approx(0.85)], [pytest.approx(statistics.stdev([0.9, 0.8]), abs=1e-4)])
    assert jobs_val == ([0.9, 0.8], None)
    assert (seeds / "comparison.png").stat().st_size > 0


def test_plot_labels_are_the_varying_overrides_with_short_keys_unless_ambiguous():
    assert sweeps._plot_labels(["task.optimizer.lr=0.1 ++seed=1", "task/model/backbone=resnet18"], ["", "failed"]) == [
        "lr=0.1\nseed=1",
        "backbone=resnet18\n(failed)",
    ]
    assert sweeps._plot_labels(["task.optimizer.lr=1", "task.scheduler.lr=1"], ["", ""]) == [
        "task.optimizer.lr=1",
        "task.scheduler.lr=1",
    ]


def test_a_rerun_without_varying_seeds_removes_a_stale_by_config_table(tmp_path):
    sweep = make_sweep(tmp_path, [record("seed=1"), record("seed=2")])
    write_summary(sweep)
    assert (sweep / "summary_by_config.csv").is_file()

    write_record(sweep / "1", record("seed=1"))
    write_summary(sweep)

    assert not (sweep / "summary_by_config.csv").exists()
    assert "By configuration" not in (sweep / "summary.md").read_text()


def test_compare_finds_runs_in_run_folders_sweeps_and_parents(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_record(Path("outputs/2026-11-29/10-00-00"), record("task.optimizer.lr=0.1", "seed=1"))
    write_record(Path("outputs/2026-11-30/09-00-00"), record("task.optimizer.lr=0.1", "seed=2"))
    make_sweep(Path("multirun/sweep"), [record("task.optimizer.lr=0.01", f"seed={seed}") for seed in range(11)])
    Path("multirun/sweep/11").mkdir()  # a job that died before writing run.json

    # The sweep is named twice (itself and its parent): its jobs still count once.
    assert main(["outputs/2026-11-29/10-00-00", "multirun", "multirun/sweep", "outputs"]) == 0

    summary = read_csv(Path("comparison/summary.csv"))
    assert [row["job"] for row in summary] == [
        "outputs/2026-11-29/10-00-00",
        *(f"multirun/sweep/{job}" for job in range(12)),
        "outputs/2026-11-30/09-00-00",
    ]
    assert summary[-2]["status"] == "interrupted"
    by_config = read_csv(Path("comparison/summary_by_config.csv"))
    assert [(row["config"], row["seeds"]) for row in by_config] == [
        ("task.optimizer.lr=0.1", "2"),
        ("task.optimizer.lr=0.01", "11"),
        ("(no run.json)", "1"),
    ]
    assert Path("comparison/summary.md").is_file()
    assert Path("comparison/comparison.png").is_file()
    out = capsys.readouterr().out
    assert "multirun/sweep/10 " in out
    assert "comparison/" in out.splitlines()[-1]


def test_compare_writes_into_out(tmp_path, capsys):
    write_record(tmp_path / "run", record("seed=1"))

    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "here")]) == 0

    assert [row["job"] for row in read_csv(tmp_path / "here" / "summary.csv")] == [str(tmp_path / "run")]
    assert str(tmp_path / "here") in capsys.readouterr().out


def test_compare_without_any_run_json_exits_2_with_one_line(tmp_path):
    (tmp_path / "empty" / "0").mkdir(parents=True)

    result = subprocess.run(
        [sys.executable, "-m", "mnist_extras.sweeps", "empty", "missing"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: no run.json in or below empty missing"]
    assert not (tmp_path / "comparison").exists()


def test_the_plot_is_scaled_to_the_accuracies_so_close_runs_look_different(tmp_path, monkeypatch):
    limits = []
    set_ylim = Axes.set_ylim

    def spy(self, *args, **kwargs):
        if len(args) == 2 and not kwargs:  # the summary's own call; matplotlib calls it too
            limits.append(args)
        return set_ylim(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "set_ylim", spy)
    write_summary(make_sweep(tmp_path, [record("lr=1", val=0.985, test=0.98), record("lr=2", val=0.995, test=0.99)]))

    ((low, high),) = limits
    assert 0.9 < low < 0.98
    assert 0.995 < high < 1.05
