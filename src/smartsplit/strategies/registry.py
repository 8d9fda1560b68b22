"""Strategies by name, as configs and the CLI refer to them; ``package.module:factory`` names your own."""

from __future__ import annotations

from typing import Callable

from smartsplit.config import StrategyConfig
from smartsplit.errors import SmartSplitError
from smartsplit.plugins import call_factory, is_plugin, load_factory
from smartsplit.strategies.base import Strategy

# A factory gets the strategy's config section, the model's number of units and the run's seed.
StrategyFactory = Callable[[StrategyConfig, int, int], Strategy]


def _fedavg(config: StrategyConfig, num_units: int, seed: int) -> Strategy:
    from smartsplit.strategies.fixed_cut import fedavg

    return fedavg(num_units)


def _fedavg_ckpt(config: StrategyConfig, num_units: int, seed: int) -> Strategy:
    from smartsplit.strategies.fixed_cut import fedavg_ckpt

    return fedavg_ckpt(num_units)


def _splitfed(version: int) -> StrategyFactory:
    def make(config: StrategyConfig, num_units: int, seed: int) -> Strategy:
        from smartsplit.strategies.fixed_cut import splitfed

        return splitfed(num_units, config.cut, version=version)

    return make


def _oort(config: StrategyConfig, num_units: int, seed: int) -> Strategy:
    from smartsplit.strategies.oort import Oort

    return Oort(num_units)


def _latency_only(config: StrategyConfig, num_units: int, seed: int) -> Strategy:
    from smartsplit.strategies.latency_only import LatencyOnly

    return LatencyOnly(num_units)


def _smartsplit(**switches: bool) -> StrategyFactory:
    def make(config: StrategyConfig, num_units: int, seed: int) -> Strategy:
        from smartsplit.strategies.smartsplit import SmartSplit
        from smartsplit.strategies.mec import MecManager

        mec = MecManager(num_units, high=config.mec_high, low=config.mec_low, smoothing=config.mec_smoothing,
                         cooldown=config.mec_cooldown, seed=seed)
        return SmartSplit(num_units, mec=mec, deadline_s=config.deadline_s, exploration=config.exploration,
                          coverage=config.coverage, **switches)

    return make


REGISTRY: dict[str, StrategyFactory] = {
    "fedavg": _fedavg,
    "fedavg-ckpt": _fedavg_ckpt,
    "splitfed": _splitfed(1),
    "splitfed-v1": _splitfed(1),
    "splitfed-v2": _splitfed(2),
    "latency-only": _latency_only,
    "oort": _oort,
    "smartsplit": _smartsplit(),
    "smartsplit-no-selection": _smartsplit(selection=False),
    "smartsplit-no-finetuning": _smartsplit(cut_finetuning=False),
    "smartsplit-no-ckpt": _smartsplit(checkpointing=False),
}
STRATEGIES = tuple(REGISTRY)
# built-ins whose devices always train the whole model and never move their cut: a round's devices never touch
# an edge server, so its parts train apart (the parallel engine splits such a round across all its workers)
TRAIN_APART = frozenset({"fedavg", "fedavg-ckpt", "oort"})


def make_strategy(config: StrategyConfig, num_units: int, seed: int = 0) -> Strategy:
    """The strategy ``config.name`` names: a built-in, or ``package.module:factory`` (called with those of
    ``config``, ``num_units`` and ``seed`` it accepts, by name; it must return a ``Strategy``)."""
    if config.cut is not None and not 1 <= config.cut <= num_units:
        raise SmartSplitError(f"strategy.cut: {config.cut} is outside 1..{num_units} for this model")
    name = config.name
    if is_plugin(name):
        strategy = call_factory("strategy.name", name, load_factory("strategy.name", name),
                                {"config": config, "num_units": num_units, "seed": seed})
        if not isinstance(strategy, Strategy):
            raise SmartSplitError(f"strategy.name {name!r}: the factory returned {type(strategy).__name__}, not a "
                                  "smartsplit.Strategy")
        return strategy
    if name not in REGISTRY:
        raise SmartSplitError(f"strategy.name: unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}, "
                              "or name your own as package.module:factory")
    return REGISTRY[name](config, num_units, seed)
