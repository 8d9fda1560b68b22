"""Experiment configuration: YAML validated by pydantic, with errors that name the field."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from smartsplit.errors import SmartSplitError, check_argument


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# The built-in names (smartsplit.data.DATASETS and SCHEMES hold the same; repeated here so that reading a config
# does not import torch). Anything with a ':' is a plug-in, ``package.module:factory`` (smartsplit.data.load_data
# and smartsplit.data.partition load and check it).
DATASETS = ("fashion-mnist", "mnist", "cifar10", "synthetic")
PARTITIONS = ("iid", "dirichlet", "shards")


def _builtin_or_plugin(value: str, builtins: tuple[str, ...], what: str, form: str) -> str:
    if value in builtins:
        return value
    module, sep, attr = value.partition(":")
    if sep and module.strip() and attr.strip() and ":" not in attr:
        return value
    raise ValueError(f"unknown {what} {value!r}: use one of {', '.join(builtins)}, "
                     f"or your own as {form}")


class DataConfig(_Section):
    dataset: str = "fashion-mnist"  # a built-in name (DATASETS) or a plug-in, package.module:factory
    root: str | None = None  # None: the dataset's default folder (Fashion-MNIST: Debian's package)
    partition: str = "dirichlet"  # a built-in scheme (PARTITIONS) or a plug-in, package.module:function
    alpha: float = Field(0.5, gt=0)
    shards_per_client: int = Field(2, ge=1)
    train_limit: int | None = Field(None, ge=1)  # subsample the training set (seeded)
    test_limit: int | None = Field(None, ge=1)
    pad_to: int | None = Field(None, ge=1)  # pad images with their background to pad_to x pad_to (28 -> 32 for VGG)
    synthetic_shape: tuple[int, int, int] = (1, 28, 28)
    synthetic_classes: int = Field(10, ge=2)
    synthetic_train: int = Field(2000, ge=10)
    synthetic_test: int = Field(500, ge=10)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        return _builtin_or_plugin(value, DATASETS, "data set", "package.module:factory")

    @field_validator("partition")
    @classmethod
    def _known_partition(cls, value: str) -> str:
        return _builtin_or_plugin(value, PARTITIONS, "partition scheme", "package.module:function")


class ModelConfig(_Section):
    name: str = "cnn"
    width: float = Field(1.0, gt=0)


class BudgetConfig(_Section):
    """How each device's memory budget moves over simulated time."""

    kind: Literal["constant", "foreground", "csv"] = "constant"
    # foreground: a seeded model of other apps taking and releasing memory (see fleet.traces)
    mean_gap_s: float = Field(60.0, gt=0)
    mean_hold_s: float = Field(30.0, gt=0)
    max_take: float = Field(0.8, ge=0, lt=1)
    floor: float = Field(0.05, ge=0, le=1)
    horizon_s: float = Field(2e5, gt=0)  # generated this far ahead; the last budget holds after it
    # csv: a folder of device-<id>.csv files (time_s,budget_mb); devices without one keep a constant budget
    csv_dir: str | None = None
    # the central manager plans with this quantile of the budget seen over the last window
    forecast_quantile: float = Field(0.1, ge=0, le=1)
    forecast_window_s: float = Field(600.0, gt=0)
    # devices plan for their budget rounded down to 1/resolution of its power of two (at most 0.8% less at
    # 128), so devices with budgets that round alike share their plans' search; 0: the exact budget
    resolution: int = Field(128, ge=0)

    @model_validator(mode="after")
    def _csv_needs_dir(self) -> "BudgetConfig":
        if self.kind == "csv" and not self.csv_dir:
            raise ValueError("kind 'csv' needs csv_dir, a folder of device-<id>.csv files")
        return self


class AvailabilityConfig(_Section):
    """When each device is online. Offline devices cannot be selected; one that goes offline mid-round drops out."""

    kind: Literal["always", "on_off", "csv"] = "always"
    # on_off: seeded alternating periods, each exponentially long with its mean (see fleet.traces)
    mean_on_s: float = Field(1800.0, gt=0)
    mean_off_s: float = Field(600.0, gt=0)
    horizon_s: float = Field(2e5, gt=0)  # generated this far ahead; the last state holds after it
    # csv: a folder of device-<id>.csv files (time_s,online with 1/0); devices without one are always online
    csv_dir: str | None = None

    @model_validator(mode="after")
    def _csv_needs_dir(self) -> "AvailabilityConfig":
        if self.kind == "csv" and not self.csv_dir:
            raise ValueError("kind 'csv' needs csv_dir, a folder of device-<id>.csv files")
        return self


class FleetConfig(_Section):
    devices: int = Field(100, ge=1)
    classes: dict[str, float] = Field(default_factory=lambda: {"phone-entry": 1.0})
    catalog: str | None = None  # None: the catalog shipped with SmartSplit
    jitter: float = Field(0.2, ge=0)
    csv: str | None = None  # a fleet saved with fleet_to_csv, instead of sampling one
    budgets: BudgetConfig = Field(default_factory=BudgetConfig)
    availability: AvailabilityConfig = Field(default_factory=AvailabilityConfig)
    # what the central server plans devices' times from: the catalog's speeds and bandwidths, or "learned":
    # the catalog at first, then running estimates from each device's reports (engine.learned)
    profiles: Literal["catalog", "learned"] = "catalog"

    @model_validator(mode="after")
    def _proportions(self) -> "FleetConfig":
        if not self.classes:
            raise ValueError("classes: give at least one device class and its share, e.g. {phone-entry: 1.0}")
        if any(v < 0 for v in self.classes.values()):
            raise ValueError("classes: shares must be non-negative")
        if abs(sum(self.classes.values()) - 1.0) > 1e-6:
            raise ValueError(f"classes: shares must sum to 1 (they sum to {sum(self.classes.values()):g})")
        return self


class TrainingConfig(_Section):
    rounds: int = Field(20, ge=1)
    devices_per_round: int = Field(10, ge=1)
    local_steps: int | None = Field(10, ge=1)
    local_epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    eval_batch_size: int = Field(1000, ge=1)
    eval_every: int = Field(1, ge=1)  # evaluate the global model after every N-th round, and after the last
    # devices that train the whole model alone may step together as one computation (engine.grouping): auto
    # (where measuring once on this machine shows it pays), always, never (one device at a time, bit for bit as before)
    grouping: Literal["auto", "always", "never"] = "auto"
    round_deadline_s: float | None = Field(None, gt=0)  # a device paused past it stops for the round

    @model_validator(mode="after")
    def _one_budget(self) -> "TrainingConfig":
        if self.local_epochs is not None:
            self.local_steps = None
        if self.local_steps is None and self.local_epochs is None:
            raise ValueError("set local_steps or local_epochs")
        return self


class StrategyConfig(_Section):
    name: str = "smartsplit"
    cut: int | None = Field(None, ge=1)  # splitfed's fixed cut; None: the middle unit
    # the central manager (smartsplit and its ablations)
    deadline_s: float | None = Field(None, gt=0)  # drop devices predicted to finish their round later
    exploration: float = Field(1.0, ge=0)  # how strongly devices never seen are explored
    coverage: float = Field(0.5, ge=0)  # weight of the label-coverage bonus
    # the MEC manager's cut fine-tuning: move a cut shallower above `mec_high`, deeper below `mec_low`
    mec_high: float = Field(0.6, ge=0, le=1)
    mec_low: float = Field(0.3, ge=0, le=1)
    mec_smoothing: float = Field(0.5, ge=0, lt=1)
    mec_cooldown: int = Field(1, ge=0)


class EdgeConfig(_Section):
    servers: int = Field(1, ge=1)  # edge servers; device i attaches to server i % servers
    gflops: float | list[float] = 2000.0  # sustained training throughput, one figure or one per server
    latency_s: float = Field(0.01, ge=0)  # per message, each way

    @model_validator(mode="after")
    def _one_speed_per_server(self) -> "EdgeConfig":
        speeds = self.gflops if isinstance(self.gflops, list) else [self.gflops]
        if isinstance(self.gflops, list) and len(speeds) != self.servers:
            raise ValueError(f"gflops lists {len(speeds)} speeds for {self.servers} servers")
        if any(g <= 0 for g in speeds):
            raise ValueError("gflops must be positive")
        return self

    def speeds(self) -> list[float]:
        return list(self.gflops) if isinstance(self.gflops, list) else [self.gflops] * self.servers


class DeploymentConfig(_Section):
    """How a deployment (``smartsplit launch``, ``server``) paces its rounds. ``lockstep``: devices follow the
    simulated clock and the run equals the embedded engine's. ``free``: devices run at their own pace, each
    edge serves their steps in the order they arrive (a real queue), and round times are measured by the wall
    clock (in the fleet's seconds: wall seconds divided by ``time_scale``)."""

    pace: Literal["lockstep", "free"] = "lockstep"
    round_wall_s: float = Field(600.0, gt=0)  # free: a round's wall-clock deadline; a device still training stops
    time_scale: float = Field(1.0, gt=0)  # free: wall seconds per second of the fleet's time (traces, links)
    # emulate each device's link in the link layer: every message waits its transfer time at the device class's
    # bandwidth, plus edge.latency_s, times time_scale
    shape_links: bool = False
    # the links' bandwidth is shaped by the kernel (each device in a network namespace with tbf, as `smartsplit
    # testbed` does where it can): shape_links then adds only the latency
    kernel_links: bool = False


class Config(_Section):
    name: str = "experiment"  # the run's folder inside output_dir
    seed: int = Field(0, ge=0)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    edge: EdgeConfig = Field(default_factory=EdgeConfig)
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    output_dir: str = "runs"
    target_accuracy: float | None = Field(None, gt=0, le=1)  # reports rounds and simulated time to reach it
    # torch threads per run: results depend on it (reduction order), so it is part of the config; the
    # simulation's many small tensors run fastest on one, and `compare` runs in parallel processes instead
    threads: int = Field(1, ge=1)
    # where grouped devices' steps are computed (cuda: the GPU torch sees; everything else stays on the CPU)
    device: Literal["cpu", "cuda"] = "cpu"
    # how convolution weights, and so activations, are laid out wherever the simulator computes (devices' and edges'
    # steps, the meter, evaluation): contiguous (PyTorch's default) or channels_last (faster CPU convolutions and
    # pooling; the same arithmetic up to floating-point order, so results differ from contiguous in the last digits)
    memory_format: Literal["contiguous", "channels_last"] = "contiguous"
    # measure device memory with the heap meter (profiles calibrated, peaks measured); false: plans rest on
    # saved-tensor profiles alone and no peak is measured (faster, and the same on every machine)
    meter: bool = True
    # false (the default): plan from the meter's figures shipped with SmartSplit (measured once on a reference
    # machine), so a config and seed give the same plans on every machine; true: measure on this machine
    calibrate: bool = False
    # where rounds train; results are the same on every engine (so a run may resume on another): sequential
    # (this process), parallel (a round's independent parts in `workers` local processes), ray (on a Ray
    # cluster: `ray_address`, or a local Ray when null)
    engine: Literal["sequential", "parallel", "ray"] = "sequential"
    workers: int | None = Field(None, ge=1)  # parallel/ray: processes or actors (default: cores // threads)
    ray_address: str | None = None  # ray: the cluster to join ("auto", "ray://head:10001"); null: start a local one

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or ".." in name:
            raise ValueError(f"{name!r} is not a plain folder name: use letters, digits, '.', '_' and '-' (runs are "
                             "written to output_dir/name and may not leave output_dir)")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.training.devices_per_round > self.fleet.devices:
            raise ValueError(f"training.devices_per_round ({self.training.devices_per_round}) is more than "
                             f"fleet.devices ({self.fleet.devices})")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise SmartSplitError(f"--set {dotted}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``key.path=value`` strings; values are read as YAML (numbers, booleans, lists, mappings)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SmartSplitError(f"--set {item!r}: expected key=value, e.g. training.rounds=5")
        try:
            parsed.append((key.strip(), yaml.safe_load(raw)))
        except yaml.YAMLError as exc:
            raise SmartSplitError(f"--set {item!r}: value is not valid YAML ({exc.__class__.__name__})") from None
    return parsed


def build_config(raw: dict[str, Any], overrides: list[str] = (), source: str = "config") -> Config:
    check_argument("build_config", "raw", raw, dict)
    check_argument("build_config", "overrides", overrides, items=str)  # 'key=value' strings, e.g. ['training.rounds=5']
    raw = copy.deepcopy(raw)  # overrides must not reach into the caller's nested mappings
    for key, value in parse_overrides(list(overrides)):
        _set_path(raw, key, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise SmartSplitError(f"{source}: {problems}") from None


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    check_argument("load_config", "path", path, str, Path)
    check_argument("load_config", "overrides", overrides, items=str)
    path = Path(path)
    if not path.is_file():
        raise SmartSplitError(f"config file {path} not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_StrictLoader)
    except UnicodeDecodeError:
        raise SmartSplitError(f"{path}: not a text file; a config is YAML (see configs/fmnist.yaml)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise SmartSplitError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if raw is None:
        raise SmartSplitError(f"{path}: the config is empty; start from one in configs/ (e.g. configs/fmnist.yaml)")
    if not isinstance(raw, dict):
        raise SmartSplitError(f"{path}: expected a mapping of sections (name, data, model, fleet, training, ...)")
    return build_config(raw, overrides, source=str(path))
