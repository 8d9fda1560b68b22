"""Strategies: the interface the server loop is built around, the registry of names, and the baselines.

SmartSplit's own strategy (the central manager, with the MEC manager's cut fine-tuning) is in ``managers``.
"""

from smartsplit.strategies.base import Assignment, Candidate, PerCut, PlanRules, RoundPlan, StepObserver, Strategy
from smartsplit.strategies.registry import STRATEGIES, make_strategy
from smartsplit.strategies.selection import sample_eligible

__all__ = ["STRATEGIES", "Assignment", "Candidate", "PerCut", "PlanRules", "RoundPlan", "StepObserver", "Strategy",
           "make_strategy", "sample_eligible"]
