"""SmartSplit: federated learning with model splitting for devices too small to train the model."""

from smartsplit.errors import SmartSplitError

__version__ = "0.1.0"
__all__ = ["SmartSplitError", "__version__"]
