"""Chain-shaped model zoo: every model is an ``nn.Sequential`` of units ``u_1 .. u_L``.

Each child maps one tensor to one tensor and the last one outputs logits, so any index ``c`` in
``1 .. L`` is a valid cut. All models normalise with GroupNorm (no running statistics): its
weights aggregate like any other weight, and micro-batching or recomputation give the same
result as a full-batch forward.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from smartsplit.errors import SmartSplitError

MODELS: tuple[str, ...] = ("cnn", "vgg11", "vgg16", "resnet18", "mobilenetv2")

_DEFAULT_SHAPE: dict[str, tuple[int, int, int]] = {
    "cnn": (1, 28, 28),
    "vgg11": (3, 32, 32),
    "vgg16": (3, 32, 32),
    "resnet18": (3, 32, 32),
    "mobilenetv2": (3, 32, 32),
}


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise SmartSplitError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")


def default_input_shape(name: str) -> tuple[int, int, int]:
    """(channels, height, width) the zoo model ``name`` expects by default."""
    _check_name(name)
    return _DEFAULT_SHAPE[name]


def gn_groups(channels: int) -> int:
    """GroupNorm groups: the largest divisor of ``channels`` not above min(32, channels // 2).

    32 groups for the usual wide layers; never one channel per group (except ``channels == 1``).
    """
    cap = max(1, min(32, channels // 2))
    return next(g for g in range(cap, 0, -1) if channels % g == 0)


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(gn_groups(channels), channels)


def _ch(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _conv_unit(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), _gn(cout), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------
# small CNN (28x28)


def _cnn(cin: int, classes: int, width: float, size: int) -> list[tuple[str, nn.Module]]:
    c1, c2, c3 = _ch(16, width), _ch(32, width), _ch(64, width)
    side = size // 2 // 2
    if side < 1:
        raise SmartSplitError(f"cnn needs input_size >= 4, got {size}")
    return [
        ("conv1", _conv_unit(cin, c1, pool=True)),
        ("conv2", _conv_unit(c1, c2, pool=True)),
        ("conv3", _conv_unit(c2, c3)),
        ("fc1", nn.Sequential(nn.Flatten(), nn.Linear(c3 * side * side, 128), nn.ReLU())),
        ("fc2", nn.Linear(128, classes)),
    ]


# ---------------------------------------------------------------------------------------------
# VGG (CIFAR variant)

_VGG_CFG: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def _vgg(cfg: list[int | str], cin: int, classes: int, width: float, size: int) -> list[tuple[str, nn.Module]]:
    units: list[tuple[str, nn.Module]] = []
    pools = sum(1 for v in cfg if v == "M")
    side = size >> pools
    if side < 1:
        raise SmartSplitError(f"VGG needs input_size >= {2 ** pools}, got {size}")
    prev = cin
    for i, v in enumerate(cfg):
        if v == "M":
            continue
        cout = _ch(int(v), width)
        pool = i + 1 < len(cfg) and cfg[i + 1] == "M"
        units.append((f"conv{len(units) + 1}", _conv_unit(prev, cout, pool=pool)))
        prev = cout
    hidden = _ch(512, width)
    units.append(("fc1", nn.Sequential(nn.Flatten(), nn.Linear(prev * side * side, hidden), nn.ReLU())))
    units.append(("fc2", nn.Linear(hidden, classes)))
    return units


# ---------------------------------------------------------------------------------------------
# ResNet-18 (CIFAR variant)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs + skip); one unit: the skip is internal to it."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.gn1 = _gn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.gn2 = _gn(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _gn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _head(cin: int, classes: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


def _resnet18(cin: int, classes: int, width: float, size: int) -> list[tuple[str, nn.Module]]:
    stem = _ch(64, width)
    units: list[tuple[str, nn.Module]] = [("stem", _conv_unit(cin, stem))]
    prev = stem
    for stage, (c, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)]):
        cout = _ch(c, width)
        for j in range(2):
            units.append((f"block{2 * stage + j + 1}", BasicBlock(prev, cout, stride if j == 0 else 1)))
            prev = cout
    units.append(("head", _head(prev, classes)))
    return units


# ---------------------------------------------------------------------------------------------
# MobileNetV2 (CIFAR variant)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection (+ skip if shapes match)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), _gn(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            _gn(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            _gn(cout),
        ]
        self.body = nn.Sequential(*layers)
        self.use_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.use_skip else out


# (expansion t, channels c, repeats n, first stride s); strides of the first two stages set to 1
# for 32x32 inputs, as in the usual CIFAR variant.
_MBV2_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _mobilenetv2(cin: int, classes: int, width: float, size: int) -> list[tuple[str, nn.Module]]:
    stem = _ch(32, width)
    units: list[tuple[str, nn.Module]] = [
        ("stem", nn.Sequential(nn.Conv2d(cin, stem, 3, padding=1, bias=False), _gn(stem), nn.ReLU6()))
    ]
    prev = stem
    for t, c, n, s in _MBV2_CFG:
        cout = _ch(c, width)
        for j in range(n):
            units.append((f"ir{len(units)}", InvertedResidual(prev, cout, s if j == 0 else 1, t)))
            prev = cout
    last = _ch(1280, width)
    units.append(("conv_last", nn.Sequential(nn.Conv2d(prev, last, 1, bias=False), _gn(last), nn.ReLU6())))
    units.append(("head", _head(last, classes)))
    return units


# ---------------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[[int, int, float, int], list[tuple[str, nn.Module]]]] = {
    "cnn": _cnn,
    "vgg11": lambda ci, k, w, s: _vgg(_VGG_CFG["vgg11"], ci, k, w, s),
    "vgg16": lambda ci, k, w, s: _vgg(_VGG_CFG["vgg16"], ci, k, w, s),
    "resnet18": _resnet18,
    "mobilenetv2": _mobilenetv2,
}


@torch.no_grad()
def init_weights(model: nn.Module, generator: torch.Generator) -> None:
    """Initialise every parameter from ``generator`` (global RNG untouched).

    Conv: Kaiming-normal (fan_out, ReLU), zero bias. Linear: PyTorch's default uniform
    ±1/sqrt(fan_in) for weight and bias. GroupNorm: weight 1, bias 0.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.in_features)
            m.weight.uniform_(-bound, bound, generator=generator)
            if m.bias is not None:
                m.bias.uniform_(-bound, bound, generator=generator)
        elif isinstance(m, nn.GroupNorm) and m.affine:
            m.weight.fill_(1.0)
            m.bias.zero_()


def build_model(
    name: str,
    *,
    in_channels: int | None = None,
    num_classes: int = 10,
    width: float = 1.0,
    input_size: int | None = None,
    seed: int = 0,
) -> nn.Sequential:
    """Build zoo model ``name`` as an ``nn.Sequential`` of units, weights drawn from ``seed``.

    ``name`` may also be ``"package.module:factory"``: your own model, built by calling ``factory`` (with
    ``in_channels`` and ``num_classes`` if it takes them) and cut into units with :func:`as_chain`.

    ``in_channels`` and ``input_size`` default to :func:`default_input_shape`; ``width`` scales
    every hidden channel count (the CNN's 128-unit hidden layer excepted). ``input_size`` sizes
    the classifier where it depends on the spatial size (cnn, VGG); ResNet/MobileNet pool globally.
    """
    if ":" in name:
        return _user_model(name, in_channels, num_classes, input_size, seed)
    _check_name(name)
    c0, s0, _ = _DEFAULT_SHAPE[name]
    cin = c0 if in_channels is None else int(in_channels)
    size = s0 if input_size is None else int(input_size)
    if cin < 1 or num_classes < 1 or size < 1 or not width > 0:
        raise SmartSplitError(
            f"build_model({name!r}): in_channels, num_classes, input_size must be >= 1 and width > 0 "
            f"(got in_channels={cin}, num_classes={num_classes}, input_size={size}, width={width})"
        )
    # Build on the meta device (no global RNG draws), then materialise and initialise locally.
    with torch.device("meta"):
        model = nn.Sequential(OrderedDict(_BUILDERS[name](cin, num_classes, width, size)))
    model = model.to_empty(device="cpu")
    init_weights(model, torch.Generator().manual_seed(int(seed)))
    return model


def _refuse_running_statistics(model: nn.Module, spec: str, shape: tuple[int, int, int]) -> None:
    """A model whose training forward changes its buffers keeps running statistics (batch normalisation, as a
    module or written with ``F.batch_norm``): refused, since aggregation, micro-batches and recomputation are
    exact only without them. Tried on a copy, on two random examples."""
    probe = copy.deepcopy(model).train()
    before = {name: b.clone() for name, b in probe.named_buffers()}
    if not before:
        return
    try:
        with torch.no_grad():
            probe(torch.randn((2, *shape), generator=torch.Generator().manual_seed(0)))
    except Exception:  # noqa: BLE001 - a model that does not run is named by the checks that follow
        return
    changed = [name for name, b in probe.named_buffers() if name in before and not torch.equal(b, before[name])]
    if changed:
        raise SmartSplitError(
            f"model.name {spec!r}: its training forward changes the buffers {', '.join(changed[:3])} (running "
            "statistics, e.g. F.batch_norm); aggregation, micro-batches and recomputation are exact only without "
            "them: use GroupNorm or LayerNorm instead")


def _user_model(spec: str, in_channels: int | None, num_classes: int, input_size: int | None, seed: int) -> nn.Sequential:
    """A model from ``"package.module:factory"``, built under a seeded RNG (the global one is restored)."""
    from smartsplit.models.chain import as_chain
    from smartsplit.plugins import call_factory, load_factory

    factory = load_factory("model.name", spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = call_factory("model.name", spec, factory, {"in_channels": in_channels, "num_classes": num_classes})
    if not isinstance(model, nn.Module):
        raise SmartSplitError(f"model.name {spec!r}: the factory returned {type(model).__name__}, not an nn.Module")
    batch_norms = [name or type(model).__name__ for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batch_norms:
        raise SmartSplitError(
            f"model.name {spec!r}: uses BatchNorm ({', '.join(batch_norms[:3])}); micro-batches and recomputation are "
            "exact only without batch statistics: use GroupNorm (e.g. nn.GroupNorm(8, channels)) or LayerNorm instead")
    if input_size is None or in_channels is None:
        raise SmartSplitError(f"model.name {spec!r}: the input shape must be known (it comes from the data set)")
    _refuse_running_statistics(model, spec, (in_channels, input_size, input_size))
    try:
        return as_chain(model, torch.zeros(2, in_channels, input_size, input_size))
    except SmartSplitError:
        raise
    except Exception as exc:
        raise SmartSplitError(f"model.name {spec!r}: the model does not run on inputs of shape "
                              f"({in_channels}, {input_size}, {input_size}) ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]})") from None
