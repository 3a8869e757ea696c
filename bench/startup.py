"""Start-up of `train.py --cfg job` and `--help` against a bare @hydra.main app on the same configs.

python -m bench.startup            # 15 interleaved rounds
"""

import argparse
import statistics
import subprocess
import sys
import time

from bench.machine import describe

COMMANDS = {
    "train.py --cfg job": [sys.executable, "train.py", "--cfg", "job"],
    "bare app --cfg job": [sys.executable, "bench/bare_app.py", "--cfg", "job"],
    "train.py --help": [sys.executable, "train.py", "--help"],
    "bare app --help": [sys.executable, "bench/bare_app.py", "--help"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(describe())
    times = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, command in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"\nmedian of {args.rounds} interleaved rounds")
    print(f"{'command':22} {'seconds':>8}")
    for name, seconds in median.items():
        print(f"{name:22} {seconds:8.3f}")
    for what in ("--cfg job", "--help"):
        ratio = median[f"train.py {what}"] / median[f"bare app {what}"]
        print(f"ratio train.py / bare app, {what}: {ratio:.2f} (goal <= 1.20)")


if __name__ == "__main__":
    main()
