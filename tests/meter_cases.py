"""Steps measured inside the memory meter's child process (``HeapMeter.measure``), for tests computed by hand."""

import torch
from torch import nn


def linear(live, peak, reset_peak, batch: int, features: int) -> dict:
    torch.manual_seed(0)
    layer = nn.Linear(features, features)
    x = torch.randn(batch, features)
    layer(x).backward(torch.randn(batch, features))  # first call: the library's one-time set-up
    layer.zero_grad(set_to_none=True)
    before = live()
    reset_peak()
    out = layer(x)
    forward = peak() - before
    grad = torch.randn_like(out)
    before = live()
    reset_peak()
    out.backward(grad)
    backward = peak() - before
    return {"forward": forward, "backward": backward}


def conv(live, peak, reset_peak, onednn: bool, batch: int, cin: int, cout: int, side: int) -> dict:
    torch.manual_seed(0)
    layer = nn.Conv2d(cin, cout, 3, bias=False)
    x = torch.randn(batch, cin, side, side)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=onednn):
        layer(x)  # first call: the library's one-time set-up
        before = live()
        reset_peak()
        out = layer(x)
        return {"peak": peak() - before, "kept": live() - before, "out": out.untyped_storage().nbytes()}
