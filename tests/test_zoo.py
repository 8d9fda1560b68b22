"""Model zoo and as_chain: chain shape, training, determinism, tracing-based splitting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smartsplit.errors import SmartSplitError
from smartsplit.models.chain import as_chain
from smartsplit.models.zoo import MODELS, build_model, default_input_shape, gn_groups

UNITS = {"cnn": 5, "vgg11": 10, "vgg16": 15, "resnet18": 10, "mobilenetv2": 20}
SMALL = 0.25


def _batch(name: str, b: int = 2, **kw: int) -> torch.Tensor:
    c, h, w = default_input_shape(name)
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, kw.get("c", c), kw.get("s", h), kw.get("s", w), generator=g)


def test_models_listed() -> None:
    assert set(MODELS) == set(UNITS)


@pytest.mark.parametrize("name", MODELS)
def test_units_compose_to_model(name: str) -> None:
    model = build_model(name, width=SMALL)
    assert isinstance(model, nn.Sequential) and len(model) == UNITS[name]
    x = _batch(name)
    y = x
    for unit in model:
        y = unit(y)
        assert isinstance(y, torch.Tensor)
    assert y.shape == (2, 10)
    assert torch.allclose(y, model(x))
    # GroupNorm only: no BatchNorm, no buffers (running statistics) anywhere.
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert list(model.buffers()) == []


@pytest.mark.parametrize("name", MODELS)
def test_default_width_output_shape(name: str) -> None:
    model = build_model(name)
    assert len(model) == UNITS[name]
    assert model(_batch(name)).shape == (2, 10)


@pytest.mark.parametrize("name", MODELS)
def test_one_sgd_step_trains(name: str) -> None:
    model = build_model(name, width=SMALL, seed=3)
    x, t = _batch(name, b=4), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss0 = nn.functional.cross_entropy(model(x), t)
    loss0.backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert sum(float(p.grad.abs().sum()) for p in model.parameters()) > 0
    opt.step()
    with torch.no_grad():
        loss1 = nn.functional.cross_entropy(model(x), t)
    assert loss1 < loss0


@pytest.mark.parametrize("name", MODELS)
def test_seed_determinism_and_global_rng_untouched(name: str) -> None:
    state = torch.get_rng_state()
    a = build_model(name, width=SMALL, seed=7).state_dict()
    b = build_model(name, width=SMALL, seed=7).state_dict()
    c = build_model(name, width=SMALL, seed=8).state_dict()
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", MODELS)
def test_custom_channels_and_classes(name: str) -> None:
    model = build_model(name, in_channels=5, num_classes=7, width=SMALL)
    assert model(_batch(name, c=5)).shape == (2, 7)


def test_cnn_input_size() -> None:
    model = build_model("cnn", in_channels=3, input_size=32, width=SMALL)
    assert model(_batch("cnn", c=3, s=32)).shape == (2, 10)
    assert build_model("vgg11", input_size=64, width=SMALL)(_batch("vgg11", s=64)).shape == (2, 10)


def test_unknown_model_and_bad_args() -> None:
    with pytest.raises(SmartSplitError, match="resnet18"):
        build_model("alexnet")
    with pytest.raises(SmartSplitError):
        default_input_shape("alexnet")
    with pytest.raises(SmartSplitError):
        build_model("cnn", num_classes=0)


def test_gn_groups() -> None:
    assert [gn_groups(c) for c in (1, 3, 4, 16, 24, 64, 1280)] == [1, 1, 2, 8, 12, 32, 32]


# ---------------------------------------------------------------------------------------------
# as_chain


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)                   # cut: only x live
        y = self.c2(torch.relu(self.c1(x)))  # skip live: no cut inside
        x = x + y                          # cut
        x = x.mean(dim=(2, 3))             # cut (x.size(0) below is not a tensor: no cut after it)
        x = x.view(x.size(0), -1)          # cut
        return self.fc(x)


def test_as_chain_residual_model() -> None:
    torch.manual_seed(0)
    model = ResNetLike()
    x = torch.randn(2, 3, 8, 8)
    chain = as_chain(model, x)
    assert len(chain) == 5
    y = x
    for unit in chain:
        y = unit(y)
    assert torch.allclose(y, model(x), atol=1e-6)
    # Units share the model's parameters, and gradients flow through the chain.
    assert {id(p) for p in chain.parameters()} == {id(p) for p in model.parameters()}
    chain(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_as_chain_sequential_is_identity() -> None:
    seq = build_model("cnn", width=SMALL)
    assert as_chain(seq, _batch("cnn")) is seq


def test_as_chain_wrapped_zoo_model_matches() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_model("resnet18", width=SMALL)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    model, x = Wrapper(), _batch("resnet18")
    chain = as_chain(model, x)
    assert len(chain) >= 10  # at least every block boundary
    assert torch.allclose(chain(x), model(x), atol=1e-5)


def test_as_chain_untraceable_raises() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return self.lin(x)
            return x

    with pytest.raises(SmartSplitError, match="could not be traced"):
        as_chain(Branchy(), torch.randn(2, 4))


def test_as_chain_no_cut_raises() -> None:
    class SkipOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.relu(self.lin(x))

    with pytest.raises(SmartSplitError, match="single tensor"):
        as_chain(SkipOnly(), torch.randn(2, 4))
