"""Strategies by name, as configs and the CLI refer to them."""

from __future__ import annotations

from smartsplit.baselines.fixed_cut import fedavg, fedavg_ckpt, splitfed
from smartsplit.config import StrategyConfig
from smartsplit.errors import SmartSplitError
from smartsplit.managers.central import SmartSplit
from smartsplit.strategy import Strategy

STRATEGIES = ("fedavg", "fedavg-ckpt", "splitfed", "smartsplit")


def make_strategy(config: StrategyConfig, num_units: int) -> Strategy:
    if config.cut is not None and not 1 <= config.cut <= num_units:
        raise SmartSplitError(f"strategy.cut: {config.cut} is outside 1..{num_units} for this model")
    if config.name == "fedavg":
        return fedavg(num_units)
    if config.name == "fedavg-ckpt":
        return fedavg_ckpt(num_units)
    if config.name == "splitfed":
        return splitfed(num_units, config.cut)
    if config.name == "smartsplit":
        return SmartSplit()
    raise SmartSplitError(f"strategy.name: unknown strategy {config.name!r}; choose one of {', '.join(STRATEGIES)}")
