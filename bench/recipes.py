"""Time to accuracy of recipes, seed by seed, side by side on one machine.

    python -m bench.recipes                          # mnist_99 against its earlier form, seeds 0-4
    python -m bench.recipes --seeds 0 1 --recipes mnist_99
    python -m bench.recipes --recipes mnist_997 --seeds 0 1 2 --goal 0.997

Each run is `python train.py trainer=cpu +seed=S <the recipe's overrides>` into a temporary folder,
as a user would type it; the runs alternate between recipes seed by seed, so the load of a shared
machine falls on all of them alike. Test accuracy and fit seconds come from each run's run.json.
"""

import argparse
import json
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


def run(overrides: list[str], seed: int, run_dir: Path) -> dict:
    command = [sys.executable, "train.py", "trainer=cpu", f"+seed={seed}", *overrides, f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    metrics = json.loads((run_dir / "run.json").read_text())["metrics"]
    return {"acc": metrics["test/acc"], "fit": metrics["fit_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--goal", type=float, default=0.99)
    args = parser.parse_args()
    print(describe())
    print(f"seeds {args.seeds}, runs alternating between recipes\n")
    results: dict[str, list[dict]] = {name: [] for name in args.recipes}
    with tempfile.TemporaryDirectory() as root:
        for seed in args.seeds:
            for name in args.recipes:
                result = run(RECIPES[name], seed, Path(root) / f"{len(results[name])}-{abs(hash(name))}")
                results[name].append(result)
                print(f"{name:34} seed {seed}: test/acc {result['acc']:.4f}, fit {result['fit']:.0f} s", flush=True)
    print(f"\n{'recipe':34} {'test/acc mean':>13} {'std':>7} {'fit s mean':>10} {'std':>5} {'>= goal':>8}")
    for name, runs in results.items():
        accs, fits = [r["acc"] for r in runs], [r["fit"] for r in runs]
        spread = (statistics.stdev(accs), statistics.stdev(fits)) if len(runs) > 1 else (0.0, 0.0)
        reached = sum(a >= args.goal for a in accs)
        print(
            f"{name:34} {statistics.mean(accs):13.4f} {spread[0]:7.4f} {statistics.mean(fits):10.1f} "
            f"{spread[1]:5.1f} {reached:>4}/{len(runs)}"
        )


if __name__ == "__main__":
    main()
