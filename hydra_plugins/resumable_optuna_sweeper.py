"""Hydra's Optuna sweeper, continuing the study that its storage already holds.

configs/hparams_search/mnist_optuna_resumable.yaml keeps the study in `optuna.db` in the sweep folder,
so the same search command run again into the same `hydra.sweep.dir` continues it:

- completed trials count toward `n_trials`: only `n_trials` minus those run;
- new trials take the job folders after the ones already there;
- a trial that an interrupted search left running is marked failed (its folder reads 'interrupted');
- a search space other than the stored study's stops the search before any trial, with
  `error: ...; fix: ...` and exit code 2: mixing two searches in one study would mislead the sampler.

Optuna is imported only when a search starts: Hydra imports every module here at start-up, even
for `--cfg job`.

The plugin has no public API for continuing a study (facebookresearch/hydra#1407, "Resuming sweep",
closed without one): this module reads and sets the attributes of its OptunaSweeperImpl
(`OptunaSweeper.sweeper`: `n_trials`, `job_idx`, `sampler`, `storage`) and calls the two methods
and the function of its `_impl` module that turn `hydra.sweeper.params` into distributions, the
same calls its own `sweep` makes. Optuna's side uses only Optuna's public API.
"""

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
        plain_optuna_logs_off_terminal()
        study = None
        if impl.storage is not None and impl.study_name is not None:
            Path(impl.sweep_dir).mkdir(parents=True, exist_ok=True)  # SQLite makes the file, not its folder
            with contextlib.suppress(KeyError):  # KeyError: no such study yet, a new search
                study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
        if study is not None and study.trials:
            continue_study(study, impl, search_space(impl, arguments))
        impl.sweep(arguments)
        if impl.storage is not None:
            save_plots(optuna.load_study(study_name=impl.study_name, storage=impl.storage), Path(impl.sweep_dir))


def search_space(impl: Any, arguments: list[str]) -> dict[str, Any]:
    """The distributions the plugin will search: hydra.sweeper.params and sweep overrides on the
    command line, less the keys the command line fixes (as the plugin's own sweep does)."""
    # Private to the plugin, with no public equivalent (facebookresearch/hydra#1407): see the module doc.
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    impl._process_searchspace_config()
    space, fixed = create_params_from_overrides(impl._parse_sweeper_params_config() + list(arguments))
    space = {**(impl.search_space_distributions or {}), **space}
    return {name: distribution for name, distribution in space.items() if name not in fixed}


def continue_study(study: Any, impl: Any, space: dict[str, Any]) -> None:
    from optuna.trial import TrialState

    stored = next((trial.distributions for trial in study.trials if trial.distributions), {})
    changed = sorted(key for key in stored.keys() | space.keys() if stored.get(key) != space.get(key))
    if stored and changed:
        err = ConfigError(
            f"hydra.sweeper.params: {listed(space, changed)}, but study '{study.study_name}' in {impl.storage} "
            f"searched {listed(stored, changed)}; fix: search the study's space again, or start a new study in a "
            "new hydra.sweep.dir"
        )
        exit_on_error(err)
        raise err
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        log.info("trial %d was left running by an interrupted search: marked failed", trial.number)
    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    wanted, impl.n_trials = impl.n_trials, max(impl.n_trials - completed, 0)
    impl.job_idx = len(study.trials)  # trial numbers and job folders stay in step
    if hasattr(impl.sampler, "reseed_rng"):
        impl.sampler.reseed_rng()  # a seeded sampler would start its sequence again and repeat the first trials
    log.info(
        "study '%s' (%s) has %d completed trials of n_trials=%d: running %d more",
        study.study_name,
        impl.storage,
        completed,
        wanted,
        impl.n_trials,
    )


def listed(distributions: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{key} in {distributions.get(key, '(not searched)')}" for key in keys)


def plain_optuna_logs_off_terminal() -> None:
    """Optuna builds its colorlog formatter without the stream it writes to, so its lines carry
    colour codes into files and pipes too; told the stream, colorlog leaves them plain there."""
    import optuna

    for handler in optuna.logging.get_logger("optuna").handlers:
        if hasattr(handler.formatter, "stream") and hasattr(handler, "stream"):
            handler.formatter.stream = handler.stream


def save_plots(study: Any, folder: Path) -> None:
    """optimization_history.png (each trial's value and the best so far) and param_slices.png (value
    against each parameter) beside optimization_results.yaml."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    plots_by_name = {"optimization_history": plots.plot_optimization_history, "param_slices": plots.plot_slice}
    # Optuna's plots set a global style (ggplot) that would restyle the sweep summary's comparison.png
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore")  # "experimental" API notices and one-point axes: noise here
        for name, plot in plots_by_name.items():
            plot(study)
            plt.gcf().savefig(folder / f"{name}.png", dpi=120, bbox_inches="tight")
            plt.close("all")
    log.info("search plots: %s, %s", folder / "optimization_history.png", folder / "param_slices.png")
