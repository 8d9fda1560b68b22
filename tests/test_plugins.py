"""Plug-in data sets and partitioners (``package.module:factory`` in a config), loaded and checked.

The plug-ins live in tests/plugin_examples.py; the tests folder is on sys.path, as for tests/user_models.py.
"""

from __future__ import annotations

import numpy as np
import plugin_examples as ex
import pytest
import torch

from smartsplit import config as config_module
from smartsplit.config import build_config
from smartsplit.data import DATASETS, SCHEMES, load_data, partition
from smartsplit.errors import SmartSplitError
from smartsplit.models.zoo import build_model


def config(*overrides: str):
    return build_config({"seed": 3}, list(overrides))


def split(cfg, labels: np.ndarray, num_clients: int) -> list[np.ndarray]:
    d = cfg.data
    return partition(labels, num_clients, d.partition, alpha=d.alpha, shards_per_client=d.shards_per_client,
                     seed=cfg.seed)


# --------------------------------------------------------------------------- config


def test_config_takes_builtin_names_and_plugin_specs() -> None:
    assert config_module.DATASETS == DATASETS and config_module.PARTITIONS == SCHEMES
    cfg = config("data.dataset=plugin_examples:tensor_data", "data.partition=plugin_examples:round_robin")
    assert (cfg.data.dataset, cfg.data.partition) == ("plugin_examples:tensor_data", "plugin_examples:round_robin")
    assert config("data.dataset=cifar10", "data.partition=shards").data.dataset == "cifar10"


@pytest.mark.parametrize("override, field, choices", [
    ("data.dataset=imagenet", "data.dataset", "fashion-mnist, mnist, cifar10, synthetic, or your own as "
                                              "package.module:factory"),
    ("data.dataset=:factory", "data.dataset", "package.module:factory"),
    ("data.dataset='module:'", "data.dataset", "package.module:factory"),
    ("data.partition=random", "data.partition", "iid, dirichlet, shards, or your own as package.module:function"),
])
def test_config_refuses_unknown_names(override: str, field: str, choices: str) -> None:
    with pytest.raises(SmartSplitError) as err:
        config(override)
    assert f"{field}: unknown" in str(err.value) and choices in str(err.value)


# --------------------------------------------------------------------------- data sets


def test_tensor_plugin_loads_with_inferred_classes() -> None:
    train, test = load_data(config("data.dataset=plugin_examples:tensor_data"))
    assert ex.calls[-1] == {"seed": 3, "train_limit": None, "test_limit": None}  # root is not set: not offered
    assert (len(train), len(test), train.shape, train.num_classes) == (200, 50, (1, 12, 12), 4)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.name == "plugin_examples:tensor_data"
    x, y, xt, yt = ex.tensor_data(seed=3)
    assert torch.equal(train.x, x) and torch.equal(train.y, y) and torch.equal(test.x, xt) and torch.equal(test.y, yt)


def test_limits_and_padding_apply_to_plugins_as_to_builtins() -> None:
    cfg = config("data.dataset=plugin_examples:tensor_data", "data.train_limit=60", "data.test_limit=500",
                 "data.pad_to=16")
    train, test = load_data(cfg)
    assert ex.calls[-1] == {"seed": 3, "train_limit": 60, "test_limit": 500}
    assert (len(train), len(test), train.shape, test.shape) == (60, 50, (1, 16, 16), (1, 16, 16))
    x, y, _, _ = ex.tensor_data(seed=3)
    keep = torch.from_numpy(np.sort(np.random.default_rng(3).permutation(200)[:60]))  # load_dataset's subsample
    assert torch.equal(train.y, y[keep]) and torch.equal(train.x[:, :, 2:14, 2:14], x[keep])
    assert float(train.x[0, 0, 0, 0]) == float(x[keep].min())  # padded with the background (lowest) value


def test_dataset_plugin_reads_only_the_kept_items() -> None:
    train, test = load_data(config("data.dataset=plugin_examples:dataset_data", "data.root=/some/where",
                                   "data.train_limit=40"))
    assert ex.calls[-1] == {"root": "/some/where", "seed": 3}
    assert (len(train), len(test), train.shape, train.num_classes) == (40, 50, (1, 12, 12), 4)
    assert ex.last_datasets["train"].reads == 40 and ex.last_datasets["test"].reads == 50
    keep = torch.from_numpy(np.sort(np.random.default_rng(3).permutation(200)[:40]))
    assert torch.equal(train.x, ex.last_datasets["train"].x[keep])
    assert torch.equal(train.y, ex.last_datasets["train"].y[keep])


def test_a_model_builds_on_plugin_data() -> None:
    train, _ = load_data(config("data.dataset=plugin_examples:tensor_data"))
    model = build_model("cnn", in_channels=train.shape[0], num_classes=train.num_classes, input_size=train.shape[1],
                        width=0.25)
    assert model(train.x[:3]).shape == (3, 4)


@pytest.mark.parametrize("factory, message", [
    ("uint8_images", "train images are torch.uint8, not float"),
    ("float_labels", "train labels are torch.float32, not integers"),
    ("flat_images", "train images must be float N x C x H x W"),
    ("wrong_label_count", "train labels must be 1-D of length 200"),
    ("shapes_disagree", "train images are 1 x 12 x 12 but test images are 1 x 10 x 10"),
    ("too_few_classes", "label 3 is outside 0..2 (num_classes is 3)"),
    ("not_square", "images are 12x10, but models take square images; set data.pad_to to at least 12"),
    ("three_things", "returned 3 items"),
    ("text", "returned str"),
    ("needs_path", "the factory needs path, but SmartSplit can only pass root, seed, train_limit, test_limit"),
    ("dataset_with_bad_items", "item 0 of the train set has label 0.5"),
    ("NOT_THERE", "cannot import 'NOT_THERE'"),
])
def test_bad_data_plugins_are_named(factory: str, message: str) -> None:
    with pytest.raises(SmartSplitError) as err:
        load_data(config(f"data.dataset=plugin_examples:{factory}"))
    text = str(err.value)
    assert text.startswith(f"data.dataset 'plugin_examples:{factory}': ") and message in text, text
    assert "\n" not in text


def test_unimportable_data_module_is_named() -> None:
    with pytest.raises(SmartSplitError, match=r"data.dataset 'no_such_module:data': cannot import"):
        load_data(config("data.dataset=no_such_module:data"))


# --------------------------------------------------------------------------- partitioners


LABELS = np.random.default_rng(0).integers(0, 4, size=103)


def test_partition_plugin_through_the_config() -> None:
    parts = split(config("data.partition=plugin_examples:round_robin"), LABELS, 5)
    assert ex.calls[-1] == {"num_clients": 5, "seed": 3}
    assert len(parts) == 5 and all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(LABELS)))
    expected = ex.round_robin(LABELS, 5, 3)
    assert all(np.array_equal(p, np.sort(e)) for p, e in zip(parts, expected))
    assert all(set(LABELS[p]) == {0, 1, 2, 3} for p in parts)


def test_builtin_schemes_unchanged_by_the_registry() -> None:
    from smartsplit.data import dirichlet, iid, shards

    assert all(np.array_equal(a, b) for a, b in zip(partition(LABELS, 4, "iid", seed=2), iid(LABELS, 4, 2)))
    assert all(np.array_equal(a, b) for a, b in zip(partition(LABELS, 4, "dirichlet", alpha=0.3, seed=2),
                                                    dirichlet(LABELS, 4, 0.3, 2)))
    assert all(np.array_equal(a, b) for a, b in zip(partition(LABELS, 4, "shards", shards_per_client=3, seed=2),
                                                    shards(LABELS, 4, 3, 2)))
    with pytest.raises(SmartSplitError, match="unknown partition scheme 'random': use one of iid, dirichlet, shards"):
        partition(LABELS, 4, "random")


@pytest.mark.parametrize("factory, message", [
    ("overlapping", "index 0 is given to client 1 and to an earlier client; clients must not overlap"),
    ("one_short", "returned 4 index arrays for 5 clients"),
    ("out_of_range", "client 4 has index 103, outside 0..102"),
    ("empty_client", "client 1 has 0 samples, fewer than 1"),
    ("float_indices", "client 0's indices must be a 1-D integer array"),
    ("raises", "the factory raised RuntimeError: broken partitioner"),
    ("text", "returned str, not a list of 5 index arrays"),
    ("NOT_THERE", "cannot import 'NOT_THERE'"),
])
def test_bad_partition_plugins_are_named(factory: str, message: str) -> None:
    with pytest.raises(SmartSplitError) as err:
        split(config(f"data.partition=plugin_examples:{factory}"), LABELS, 5)
    text = str(err.value)
    assert text.startswith(f"data.partition 'plugin_examples:{factory}': ") and message in text, text


def test_partition_plugin_gets_a_copy_of_the_labels() -> None:
    labels = LABELS.copy()

    def spoil(labels: np.ndarray, num_clients: int) -> list[np.ndarray]:
        labels[:] = 0
        return list(np.array_split(np.arange(len(labels)), num_clients))

    ex.spoil = spoil
    try:
        partition(labels, 3, "plugin_examples:spoil")
    finally:
        del ex.spoil
    assert np.array_equal(labels, LABELS)
