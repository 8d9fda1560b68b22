"""SmartSplit: federated learning with model splitting for devices too small to train the model.

    from smartsplit import Config, Experiment, Strategy, run, compare

``run(config)`` runs one experiment and returns its summary; ``compare(config, strategies, seeds)`` runs
several; ``Strategy`` is the interface to write your own (``run(config, strategy=MyStrategy())``, or name its
factory in YAML as ``strategy.name: package.module:factory``); ``Experiment`` steps through rounds yourself.
"""

from smartsplit.errors import SmartSplitError

__version__ = "0.1.0"

_LAZY = {  # imported on first use, so that `import smartsplit` (and the CLI's start) stays light
    "Config": "smartsplit.config",
    "load_config": "smartsplit.config",
    "Experiment": "smartsplit.engine.experiment",
    "Strategy": "smartsplit.strategies",
    "Candidate": "smartsplit.strategies",
    "Candidates": "smartsplit.strategies",
    "Assignment": "smartsplit.strategies",
    "RoundPlan": "smartsplit.strategies",
    "PlanRules": "smartsplit.strategies",
    "EngineOptions": "smartsplit.strategies.options",
    "StepObserver": "smartsplit.strategies",
    "DeviceReport": "smartsplit.records",
    "RoundRecord": "smartsplit.records",
    "RunSummary": "smartsplit.reports.summary",
    "run": "smartsplit.api",
    "compare": "smartsplit.api",
}

__all__ = ["SmartSplitError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'smartsplit' has no attribute {name!r}")
