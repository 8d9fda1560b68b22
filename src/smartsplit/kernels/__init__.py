"""The tensor-level pieces every training path shares: the two halves of a split step and the optimizer
(``step``), layer-wise aggregation (``aggregate``), and the count of bytes autograd saves for backward, which is
also the live step's memory guard (``saved``). They import nothing from SmartSplit but its messages."""
