"""Time to accuracy of recipes, seed by seed, side by side on one machine.

    python -m bench.recipes --recipes mnist_99 "mnist_99 at 55%" "mnist_99 at 60%"   # seeds 0-4
    python -m bench.recipes --seeds 0 1 --recipes mnist_99
    python -m bench.recipes --recipes mnist_997 --seeds 0 1 2 --goal 0.997 --fit-limit 3600

The speed cache (callbacks=speed) starts empty in a folder of its own, so the first run measures.

Each run is `python train.py trainer=cpu +seed=S <the recipe's overrides>` into a temporary folder,
as a user would type it; the runs alternate between recipes seed by seed, so the load of a shared
machine falls on all of them alike. Test accuracy and fit seconds come from each run's run.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.machine import describe
from train import CONFIG_DIR

PROJECT_DIR = CONFIG_DIR.parent

RECIPES = {
    "mnist_99": ["+experiment=mnist_99"],
    # mnist_99 until 2026-12-01: batch 512 on 60% of the training set each epoch (66,000 digits).
    "mnist_99 at 60%": ["+experiment=mnist_99", "data_module.batch_size=512", "trainer.limit_train_batches=0.6"],
    # The same at 55% (60,500 digits).
    "mnist_99 at 55%": ["+experiment=mnist_99", "data_module.batch_size=512", "trainer.limit_train_batches=0.55"],
    # mnist_99 in one epoch of its two: what about a minute of fit reaches.
    "mnist_99, one epoch": ["+experiment=mnist_99", "trainer.max_epochs=1"],
    # mnist_99 as it was: ImageNet stem, fp32, two epochs of a random 3/4 of the set at batch 256.
    "mnist_99 before": [
        "+experiment=mnist_99",
        "task.model.backbone.stem=imagenet",
        "callbacks=default",  # no measured speed; the centre taps, as every backbone had them then
        "+callbacks.centre_taps._target_=mnist_extras.layers.CentreTaps",
        "data_module.batch_size=256",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=0.75",
    ],
    "mnist_995": ["+experiment=mnist_995"],
    "mnist_997": ["+experiment=mnist_997"],
}


def run(overrides: list[str], seed: int, run_dir: Path, cache: Path) -> dict:
    command = [sys.executable, "train.py", "trainer=cpu", f"+seed={seed}", *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    done = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    metrics = json.loads((run_dir / "run.json").read_text())["metrics"]
    log = (run_dir / "train.log").read_text().splitlines()
    speed = [line.partition("speed: ")[2] for line in log if "speed: " in line]
    return {"acc": metrics["test/acc"], "fit": metrics["fit_seconds"], "speed": speed[0] if speed else ""}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--goal", type=float, default=0.99, help="test accuracy to reach")
    parser.add_argument("--fit-limit", type=float, default=60.0, help="seconds of fit to reach it in")
    args = parser.parse_args()
    print(describe())
    print(f"seeds {args.seeds}, runs alternating between recipes\n")
    results: dict[str, list[dict]] = {name: [] for name in args.recipes}
    with tempfile.TemporaryDirectory() as root:
        for seed in args.seeds:
            for name in args.recipes:
                run_dir = Path(root) / f"{len(results[name])}-{abs(hash(name))}"
                result = run(RECIPES[name], seed, run_dir, Path(root) / "cache")
                results[name].append(result)
                print(f"{name:34} seed {seed}: test/acc {result['acc']:.4f}, fit {result['fit']:.0f} s", flush=True)
                if result["speed"]:
                    print(f"{'':34} speed: {result['speed']}", flush=True)
    print(f"\n{'recipe':34} {'test/acc mean':>13} {'std':>7} {'fit s mean':>10} {'std':>5} {'reached':>8}")
    print(f"{'':34} (reached: test/acc >= {args.goal} in <= {args.fit_limit:.0f} s of fit)")
    for name, runs in results.items():
        accs, fits = [r["acc"] for r in runs], [r["fit"] for r in runs]
        spread = (statistics.stdev(accs), statistics.stdev(fits)) if len(runs) > 1 else (0.0, 0.0)
        reached = sum(r["acc"] >= args.goal and r["fit"] <= args.fit_limit for r in runs)
        print(
            f"{name:34} {statistics.mean(accs):13.4f} {spread[0]:7.4f} {statistics.mean(fits):10.1f} "
            f"{spread[1]:5.1f} {reached:>4}/{len(runs)}"
        )


if __name__ == "__main__":
    main()
