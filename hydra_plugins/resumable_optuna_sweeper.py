"""Hydra's Optuna sweeper, continuing the study its storage holds when the same search runs again into the
same `hydra.sweep.dir`: completed trials count toward `n_trials`, a trial left running is marked failed, and
another search space stops before any trial (exit 2). The plugin has no public API for this
(facebookresearch/hydra#1407): this sets its OptunaSweeperImpl's `n_trials`, `job_idx` and `sampler`, and
makes the private calls its `sweep` makes."""

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

from mnist_extras.errors import ConfigError, exit_on_error

log = logging.getLogger(__name__)


class ResumableOptunaSweeper(OptunaSweeper):
    def sweep(self, arguments: list[str]) -> None:
        import optuna

        impl = self.sweeper  # the plugin's OptunaSweeperImpl, which runs the search
        # Optuna's colorlog formatter, told its stream, leaves lines plain in files and pipes.
        for handler in optuna.logging.get_logger("optuna").handlers:
            if hasattr(handler.formatter, "stream") and hasattr(handler, "stream"):
                handler.formatter.stream = handler.stream
        study = None
        if impl.storage is not None and impl.study_name is not None:
            Path(impl.sweep_dir).mkdir(parents=True, exist_ok=True)  # SQLite makes the file, not its folder
            with contextlib.suppress(KeyError):  # no such study yet: a new search
                study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
        if study is not None and study.trials:
            continue_study(study, impl, search_space(impl, arguments))
        impl.sweep(arguments)
        if impl.storage is not None:
            save_plots(optuna.load_study(study_name=impl.study_name, storage=impl.storage), Path(impl.sweep_dir))


def search_space(impl: Any, arguments: list[str]) -> dict[str, Any]:
    """hydra.sweeper.params and the command line's sweeps, less the keys it fixes, as the plugin does."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides  # see the module doc

    impl._process_searchspace_config()
    space, fixed, _ = create_params_from_overrides(impl._parse_sweeper_params_config() + list(arguments))
    return {k: v for k, v in space.items() if k not in fixed}


def continue_study(study: Any, impl: Any, space: dict[str, Any]) -> None:
    from optuna.trial import TrialState

    stored = next((trial.distributions for trial in study.trials if trial.distributions), {})
    changed = sorted(key for key in stored.keys() | space.keys() if stored.get(key) != space.get(key))
    if stored and changed:
        asked = ", ".join(f"{key} in {space.get(key, '(not searched)')}" for key in changed)
        searched = ", ".join(f"{key} in {stored.get(key, '(not searched)')}" for key in changed)
        fix = "fix: search the study's space again, or start a new study in a new hydra.sweep.dir"
        where = f"study '{study.study_name}' in {impl.storage}"
        exit_on_error(ConfigError(f"hydra.sweeper.params: {asked}, but {where} searched {searched}; {fix}"))
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        log.info("trial %d was left running by an interrupted search: marked failed", trial.number)
    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    wanted, impl.n_trials = impl.n_trials, max(impl.n_trials - completed, 0)
    impl.job_idx = len(study.trials)  # trial numbers and job folders stay in step
    if hasattr(impl.sampler, "reseed_rng"):
        impl.sampler.reseed_rng()  # a seeded sampler would start again and repeat the first trials
    log.info("study '%s': %d of n_trials=%d completed, %d to run", study.study_name, completed, wanted, impl.n_trials)


def save_plots(study: Any, folder: Path) -> None:
    """optimization_history.png and param_slices.png beside optimization_results.yaml."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    # Optuna's plots set a global style (ggplot) that would restyle the sweep summary's comparison.png.
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore")  # "experimental" API notices and one-point axes: noise here
        history, slices = plots.plot_optimization_history, plots.plot_slice
        for name, plot in [("optimization_history", history), ("param_slices", slices)]:
            plot(study)
            plt.gcf().savefig(folder / f"{name}.png", dpi=120, bbox_inches="tight")
            plt.close("all")
    log.info("search plots: %s, %s", folder / "optimization_history.png", folder / "param_slices.png")
