"""A model as a user would write it: not an nn.Sequential, with a residual connection."""

from torch import nn


class TinyResidual(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.stem(x).relu()
        x = x + self.body(x).relu()
        return self.fc(self.pool(x).flatten(1))


def tiny_residual(in_channels: int, num_classes: int) -> TinyResidual:
    return TinyResidual(in_channels, num_classes)


# Factories that go wrong, each in a way a user's model can (tests/test_hardening.py).


def raises(in_channels: int, num_classes: int) -> nn.Module:
    raise RuntimeError("broken factory")


def needs_depth(depth: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))


NOT_CALLABLE = 3


def with_batch_norm(in_channels: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(num_classes))


def wrong_channels(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))


def wrong_width(in_channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7))


class _FunctionalBatchNorm(nn.Module):
    """Batch normalisation written with F.batch_norm on buffers: running statistics no nn.BatchNorm announces."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        import torch

        self.conv = nn.Conv2d(in_channels, 4, 3)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    def forward(self, x):
        from torch.nn import functional as F

        return self.head(F.batch_norm(self.conv(x), self.mean, self.var, training=self.training))


def functional_batch_norm(in_channels: int, num_classes: int) -> nn.Module:
    return _FunctionalBatchNorm(in_channels, num_classes)


def reshapes_first(in_channels: int, num_classes: int) -> nn.Module:
    """A first unit with no parameters: at cut 1 the device trains nothing and sends its input on."""
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, num_classes))
