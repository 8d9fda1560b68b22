"""Strategies by name, as configs and the CLI refer to them."""

from __future__ import annotations

from smartsplit.baselines.fixed_cut import fedavg, fedavg_ckpt, splitfed
from smartsplit.baselines.latency_only import LatencyOnly
from smartsplit.baselines.oort import Oort
from smartsplit.config import StrategyConfig
from smartsplit.errors import SmartSplitError
from smartsplit.managers.central import SmartSplit
from smartsplit.managers.mec import MecManager
from smartsplit.strategy import Strategy

_ABLATIONS = {
    "smartsplit": {},
    "smartsplit-no-selection": {"selection": False},
    "smartsplit-no-finetuning": {"cut_finetuning": False},
    "smartsplit-no-ckpt": {"checkpointing": False},
}
STRATEGIES = ("fedavg", "fedavg-ckpt", "splitfed", "splitfed-v1", "splitfed-v2", "latency-only", "oort", *_ABLATIONS)


def make_strategy(config: StrategyConfig, num_units: int) -> Strategy:
    if config.cut is not None and not 1 <= config.cut <= num_units:
        raise SmartSplitError(f"strategy.cut: {config.cut} is outside 1..{num_units} for this model")
    name = config.name
    if name == "fedavg":
        return fedavg(num_units)
    if name == "fedavg-ckpt":
        return fedavg_ckpt(num_units)
    if name in ("splitfed", "splitfed-v1", "splitfed-v2"):
        return splitfed(num_units, config.cut, version=2 if name == "splitfed-v2" else 1)
    if name == "oort":
        return Oort(num_units)
    if name == "latency-only":
        return LatencyOnly(num_units)
    if name in _ABLATIONS:
        mec = MecManager(
            num_units, high=config.mec_high, low=config.mec_low, smoothing=config.mec_smoothing, cooldown=config.mec_cooldown
        )
        return SmartSplit(
            num_units, mec=mec, deadline_s=config.deadline_s, exploration=config.exploration, coverage=config.coverage,
            **_ABLATIONS[name],
        )
    raise SmartSplitError(f"strategy.name: unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
