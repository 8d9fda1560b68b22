"""Strategies: the interface the server loop is built around, the registry of names, and the baselines.

SmartSplit's own strategy (the central manager, ``smartsplit``, with the MEC manager's cut fine-tuning, ``mec``)
and the options that say how the engine runs a strategy's rounds (``options``) are here too.
"""

from smartsplit.strategies.base import (
    Assignment, Candidate, Candidates, PerCut, PlanRules, RoundPlan, StepObserver, Strategy,
)
from smartsplit.strategies.registry import STRATEGIES, make_strategy
from smartsplit.strategies.selection import sample_eligible

__all__ = ["STRATEGIES", "Assignment", "Candidate", "Candidates", "PerCut", "PlanRules", "RoundPlan", "StepObserver",
           "Strategy", "make_strategy", "sample_eligible"]
