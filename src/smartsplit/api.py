"""Run experiments from Python: ``run`` one config, ``compare`` several strategies and seeds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from smartsplit.config import Config, build_config, load_config
from smartsplit.errors import SmartSplitError, check_argument
from smartsplit.plugins import is_plugin, load_factory
from smartsplit.reports.summary import RunSummary
from smartsplit.strategies import STRATEGIES, Strategy

log = logging.getLogger("smartsplit")


def _config(config: Config | str | Path, overrides: Sequence[str]) -> Config:
    if isinstance(config, Config):
        if not overrides:
            return config
        return build_config(config.model_dump(mode="json"), list(overrides))
    return load_config(config, list(overrides))


def _check_common(function: str, config: object, overrides: object, **flags: object) -> None:
    check_argument(function, "config", config, Config, str, Path)
    check_argument(function, "overrides", overrides, items=str)
    for name, value in flags.items():
        check_argument(function, name, value, bool)


def run(
    config: Config | str | Path,
    *,
    strategy: Strategy | None = None,
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
) -> RunSummary:
    """Run one experiment and return its summary; its files go to ``run_dir`` (default
    ``<output_dir>/<name>``) as they are produced.

    ``config`` is a ``Config`` or a YAML file; ``overrides`` are ``key.path=value`` strings as for ``--set``.
    ``strategy`` runs your own ``Strategy`` object instead of the one ``strategy.name`` names (the name then
    labels the run). ``resume`` continues the run in ``run_dir`` after its last finished round (with a strategy
    object: pass the same config and a fresh object of the same class; its ``load_state_dict`` gets what it saved).
    """
    from smartsplit.runtime.embedded import run_experiment

    _check_common("run", config, overrides, overwrite=overwrite, resume=resume, progress=progress)
    check_argument("run", "strategy", strategy, Strategy, type(None))
    check_argument("run", "run_dir", run_dir, str, Path, type(None))
    config = _config(config, overrides)
    if strategy is not None:  # the run is labelled, in its files and summary, by the object's name
        config = config.model_copy(update={"strategy": config.strategy.model_copy(update={"name": str(strategy.name)})})
    return run_experiment(config, run_dir, progress=progress, resume=resume, overwrite=overwrite, strategy=strategy)


def run_name(base: str, strategy: str, seed: int | None = None) -> str:
    """The run folder's name for one (strategy, seed) of a comparison (a plug-in is named by its factory)."""
    label = strategy.rsplit(":", 1)[-1] if is_plugin(strategy) else strategy
    return f"{base}-{label}" + (f"-s{seed}" if seed is not None else "")


def compare(
    config: Config | str | Path,
    strategies: Sequence[str],
    seeds: Sequence[int] | None = None,
    *,
    overrides: Sequence[str] = (),
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    report: bool = True,
) -> list[RunSummary]:
    """Run ``config`` under each strategy (registry names or ``package.module:factory``) and seed, each run in
    its own process (``workers`` at once, default one per core), and write ``<output_dir>/<name>-report``.
    Every run folder is checked before any run starts. Returns the summaries in (strategy, seed) order."""
    from smartsplit.reports.report import write_report
    from smartsplit.runtime.folder import check_run_folder, check_writable
    from smartsplit.runtime.concurrent import run_many

    _check_common("compare", config, overrides, overwrite=overwrite, progress=progress, report=report)
    check_argument("compare", "strategies", strategies, items=str)
    if seeds is not None:
        check_argument("compare", "seeds", seeds, items=int)
    check_argument("compare", "workers", workers, int, type(None))
    base = _config(config, overrides)
    strategies = list(strategies)
    seeds = list(seeds) if seeds else [base.seed]
    if not strategies:
        raise SmartSplitError("compare: give at least one strategy")
    if any(s < 0 for s in seeds) or len(set(seeds)) < len(seeds):
        raise SmartSplitError(f"seeds {seeds}: seeds must be distinct and non-negative")
    if workers is not None and workers < 1:
        raise SmartSplitError(f"workers must be at least 1, got {workers}")
    for name in strategies:  # before any run starts
        if is_plugin(name):
            load_factory("strategies", name)
        elif name not in STRATEGIES:
            raise SmartSplitError(f"strategies: unknown {name!r}; choose from {', '.join(STRATEGIES)}, or name your own "
                                  "as package.module:factory")
    base_raw = base.model_dump(mode="json")
    configs = []
    for name in strategies:
        for seed in seeds:
            configs.append(build_config(base_raw, [f"strategy.name={name}", f"seed={seed}",
                                                   f"name={run_name(base.name, name, seed if len(seeds) > 1 else None)}"]))
    for c in configs:
        check_run_folder(Path(c.output_dir) / c.name, overwrite=overwrite)
    report_dir = Path(base.output_dir) / f"{base.name}-report"
    if report:
        check_writable(report_dir, "report folder")
    log.info("running %d runs (%d strategies x %d seeds)", len(configs), len(strategies), len(seeds))
    summaries = run_many(configs, workers, progress=progress, overwrite=overwrite,
                         on_done=lambda s: log.info("done: %s: final accuracy %.4f (%.0f s)", s.name, s.final_accuracy or 0.0, s.wall_s or 0.0))
    if report:
        path = write_report([s.run_dir for s in summaries], report_dir)
        log.info("report: %s", path)
    return summaries
