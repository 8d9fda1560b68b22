"""Data sets (Fashion-MNIST, MNIST, CIFAR-10, synthetic, or your own) and client partitioners."""

from smartsplit.data.datasets import DATASETS, FASHION_MNIST_ROOT, Dataset, load_dataset, synthetic
from smartsplit.data.partition import SCHEMES, Shards, dirichlet, iid, label_counts, label_skew, partition, shards
from smartsplit.data.sources import load_data

__all__ = [
    "DATASETS",
    "FASHION_MNIST_ROOT",
    "SCHEMES",
    "Dataset",
    "Shards",
    "dirichlet",
    "iid",
    "label_counts",
    "label_skew",
    "load_data",
    "load_dataset",
    "partition",
    "shards",
    "synthetic",
]
