"""Profiler and memory model against figures worked out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smartsplit.errors import SmartSplitError
from smartsplit.memory.model import MARGIN_BYTES, MARGIN_FRACTION, activation_bytes, device_memory, optimizer_slots
from smartsplit.meter.heap import UnitCost
from smartsplit.kernels.saved import DeviceOutOfMemory, SavedBytes, count_saved_bytes
from smartsplit.models.profile import ModelProfile, UnitProfile
from smartsplit.models.profile import ProfileCache, profile_chain

F32 = 4  # bytes per float32
B = 5  # batch used throughout


def mlp() -> nn.Sequential:
    """u1 = Linear(4,3), u2 = ReLU, u3 = Linear(3,2)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


# --------------------------------------------------------------------------- per-unit figures


def test_linear_relu_linear_by_hand() -> None:
    p = profile_chain(mlp(), (4,), B)
    assert p.num_units == 3 and p.batch == B and p.dtype == "float32" and p.input_shape == (4,)
    assert p.input_bytes == B * 4 * F32

    # parameters: weight + bias
    assert [u.param_bytes for u in p.units] == [(4 * 3 + 3) * F32, 0, (3 * 2 + 2) * F32]
    # outputs: B x 3, B x 3, B x 2
    assert [u.output_bytes for u in p.units] == [B * 3 * F32, B * 3 * F32, B * 2 * F32]
    assert [u.input_bytes for u in p.units] == [B * 4 * F32, B * 3 * F32, B * 3 * F32]
    # forward FLOPs: 2*M*N*K per matmul, ReLU free
    assert [u.flops for u in p.units] == [2 * B * 4 * 3, 0, 2 * B * 3 * 2]
    # saved for backward (the weight, a parameter, never counts):
    #  Linear saves its input; ReLU saves its output; nothing else of their own
    assert [(u.saves_input, u.saves_output, u.internal_bytes) for u in p.units] == [
        (True, False, 0), (False, True, 0), (True, False, 0)
    ]
    assert [u.saved_bytes for u in p.units] == [B * 4 * F32, B * 3 * F32, B * 3 * F32]
    assert [u.name for u in p.units] == ["Linear", "ReLU", "Linear"]
    assert [u.index for u in p.units] == [1, 2, 3]


def activations(p, cut: int) -> int:
    return activation_bytes(p, cut)


def test_device_activations_count_shared_storages_once() -> None:
    """Activations held on the device: the raw batch (`input`) and the cut activation (`cut_io`) apart,
    a storage that two neighbouring units save counted once."""
    p = profile_chain(mlp(), (4,), B)
    # cut 1: Linear saved only the raw batch -> 0. cut 2: ReLU's saved output *is* the cut activation -> 0.
    assert [activations(p, c) for c in (1, 2)] == [0, 0]
    # cut 3: ReLU's output, saved by ReLU and by the last Linear, once (not 2x); the logits are not saved
    assert activations(p, 3) == B * 3 * F32


def test_linear_saves_its_input_activation() -> None:
    """Without a ReLU in between, the second Linear's saved input is the first Linear's output."""
    torch.manual_seed(0)
    p = profile_chain(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), (4,), B)
    assert [(u.saves_input, u.saves_output, u.internal_bytes) for u in p.units] == [(True, False, 0)] * 2
    assert [u.flops for u in p.units] == [2 * B * 4 * 3, 2 * B * 3 * 2]
    assert [activations(p, c) for c in (1, 2)] == [0, B * 3 * F32]


def test_internal_saves_of_a_composite_unit() -> None:
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3)), nn.Linear(3, 2))
    p = profile_chain(chain, (4,), B)
    u1 = p.unit(1)
    # inside unit 1 the ReLU output (saved by ReLU and by the inner Linear: one storage) is internal
    assert (u1.saves_input, u1.saves_output, u1.internal_bytes) == (True, False, B * 3 * F32)
    assert u1.param_bytes == (15 + 12) * F32 and u1.flops == 2 * B * 4 * 3 + 2 * B * 3 * 3
    assert u1.name == "Linear+ReLU+Linear"
    # cut 1: the internal ReLU output; cut 2: plus unit 1's output, which unit 2 saves as its input
    assert [activations(p, c) for c in (1, 2)] == [B * 3 * F32, 2 * B * 3 * F32]


def test_tiny_conv_by_hand() -> None:
    torch.manual_seed(0)
    chain = nn.Sequential(
        nn.Conv2d(1, 2, 3, bias=False),  # 1x5x5 -> 2x3x3
        nn.ReLU(),
        nn.Sequential(nn.Flatten(), nn.Linear(18, 4)),
    )
    p = profile_chain(chain, (1, 5, 5), B)
    assert p.input_bytes == B * 25 * F32
    assert [u.param_bytes for u in p.units] == [2 * 1 * 3 * 3 * F32, 0, (18 * 4 + 4) * F32]
    assert [u.output_bytes for u in p.units] == [B * 18 * F32, B * 18 * F32, B * 4 * F32]
    # conv: 2 * N * Cout * Hout * Wout * (Cin * kh * kw)
    assert [u.flops for u in p.units] == [2 * B * 2 * 3 * 3 * 9, 0, 2 * B * 18 * 4]
    # conv saves its input (+ weight, excluded); ReLU its output; Flatten is a view, so the Linear's saved
    # input is unit 3's input storage
    assert [(u.saves_input, u.saves_output, u.internal_bytes) for u in p.units] == [
        (True, False, 0), (False, True, 0), (True, False, 0)
    ]
    assert p.units[2].name == "Flatten+Linear"
    assert [activations(p, c) for c in (1, 2, 3)] == [0, 0, B * 18 * F32]


def test_profile_helpers_and_weights_untouched() -> None:
    chain = mlp()
    before = [t.clone() for t in chain.state_dict().values()]
    p = profile_chain(chain, (4,), B)
    assert all(torch.equal(a, b) for a, b in zip(before, chain.state_dict().values()))
    assert all(p.grad is None for p in chain.parameters())
    assert p.param_bytes(1, 3) == (15 + 8) * F32 and p.param_bytes(2, 2) == 0
    assert p.flops(1, 2) == 2 * B * 4 * 3 and p.flops(3, 3) == 2 * B * 3 * 2
    assert p.cut_bytes(1) == B * 3 * F32 and p.cut_bytes(3) == 0  # at cut = L nothing crosses
    assert [u.index for u in p.device_units(2)] == [1, 2] and [u.index for u in p.edge_units(2)] == [3]


def test_profile_cache_keys() -> None:
    cache, chain = ProfileCache(), mlp()
    a = cache.get("mlp", chain, (4,), B)
    assert cache.get("mlp", chain, (4,), B) is a
    b = cache.get("mlp", chain, (4,), 2 * B)
    assert b is not a and b.batch == 2 * B and b.unit(2).output_bytes == 2 * B * 3 * F32


# --------------------------------------------------------------------------- memory model


def two_units() -> ModelProfile:
    """A made-up chain with meter figures chosen by hand: u1 saves its input (the raw batch) and 100 bytes of its
    own, u2 saves 200 bytes of its own and its output."""
    u1 = UnitProfile(1, "u1", param_bytes=10, internal_bytes=100, saves_input=True, saves_output=False, output_bytes=10,
                     flops=1, input_bytes=8,
                     cost=UnitCost(static=50, grads=10, forward_peak=120, forward_kept=115, backward_first=30,
                                   backward_accumulating=22, backward_first_at_cut=25, backward_accumulating_at_cut=18,
                                   checkpoint_kept=16, optimizer_peak=3))
    u2 = UnitProfile(2, "u2", param_bytes=20, internal_bytes=200, saves_input=False, saves_output=True, output_bytes=20,
                     flops=1, input_bytes=10,
                     cost=UnitCost(static=80, grads=20, forward_peak=230, forward_kept=222, backward_first=60,
                                   backward_accumulating=45, backward_first_at_cut=55, backward_accumulating_at_cut=40,
                                   checkpoint_kept=30, optimizer_peak=4))
    return ModelProfile(input_shape=(2,), batch=1, dtype="float32", input_bytes=8, units=(u1, u2))


def with_margin(total: int) -> int:
    return total + int(MARGIN_FRACTION * total) + MARGIN_BYTES


def test_device_memory_walks_the_step_by_hand() -> None:
    p = two_units()
    # weights and momentum 40 + 60; autograd graph kept: u1 5 bytes, u2 2 bytes
    # forward 1: 100 + 8 (batch) + 120 = 228; forward 2: 100 + 8 + (100 + 5 + 10, u1's output as input) + 230 = 453
    # link: 100 + 8 + 300 + 7 + 2 x 20 = 455
    # backward 2 (at the cut): 100 + 8 + (100 + 7 + 200) + 40 + 55 = 510
    # backward 1: 100 + 20 (u2's gradients) + 8 + (5 + 100) + 40 + 30 = 303; optimizer: 100 + 30 + 4 = 134
    m = device_memory(p, 2, slots=1)
    assert m.phase == "backward 2"
    assert (m.static, m.input, m.activations, m.cut_io, m.transient) == (100, 8, 307, 40, 55)
    assert m.total == with_margin(510)
    # from the second micro-batch on, all 30 bytes of gradients exist throughout and u2 adds to its own:
    # backward 2 then holds 100 + 30 + 8 + 307 + 40 + 40 = 525
    m = device_memory(p, 2, slots=1, micro_batches=2)
    assert m.phase == "backward 2, later micro-batches" and m.total == with_margin(525)
    # u1 checkpointed: it keeps only its input (the batch) and 16 - 10 bytes of checkpoint bookkeeping; recomputed,
    # it holds 120 + u1's output gradient 10 on top of u2's gradients: 120 + 8 + 6 + 40 + 130 = 304; backward 2
    # then holds 6 + 7 + 200: 416
    m = device_memory(p, 2, slots=1, segments=((1, 1),))
    assert m.phase == "backward 2" and m.total == with_margin(416)
    # cut 1: forward 40 + 8 + 120 = 168; link 40 + 8 + 105 + 20 = 173; backward 1 at the cut: 40 + 8 + 105 + 20 + 25
    m = device_memory(p, 1, slots=1)
    assert m.phase == "backward 1" and m.total == with_margin(198)


def test_device_memory_rejects_bad_cut() -> None:
    p = profile_chain(mlp(), (4,), B)
    for cut in (0, 4):
        with pytest.raises(SmartSplitError, match="outside 1..3"):
            device_memory(p, cut, slots=0)


def test_optimizer_slots() -> None:
    assert optimizer_slots("sgd") == 0 and optimizer_slots("sgd", 0.9) == 1 and optimizer_slots("adam") == 2
    with pytest.raises(SmartSplitError, match="rmsprop"):
        optimizer_slots("rmsprop")


# --------------------------------------------------------------------------- saved-tensor accounting


def test_count_saved_bytes_counts_each_storage_once_and_excludes() -> None:
    w = torch.randn(6, requires_grad=True)
    x = torch.randn(6, requires_grad=True)
    with count_saved_bytes(exclude=[w]) as meter:
        y = torch.relu(x)  # saves y
        z = y * w  # saves y (again) and w (excluded)
    assert meter.total == 6 * F32
    z.sum().backward()  # the hooks hand the tensors back unchanged
    assert torch.allclose(x.grad, (x > 0).float() * w.detach())


def test_count_saved_bytes_limit_raises() -> None:
    x = torch.randn(10, requires_grad=True)
    with pytest.raises(DeviceOutOfMemory) as info:
        with count_saved_bytes(limit=10 * F32 + 3):
            a = torch.relu(x)  # 40 bytes: fits
            torch.relu(a + 1)  # 40 more: crosses
    assert info.value.saved == 20 * F32 and info.value.limit == 10 * F32 + 3
    # within the limit nothing is raised
    with count_saved_bytes(limit=10 * F32) as meter:
        torch.relu(x)
    assert meter.total == 10 * F32


def test_saved_bytes_guard() -> None:
    meter = SavedBytes(limit=5)
    meter.add(torch.empty(0))  # empty storages are free
    assert meter.total == 0
    with pytest.raises(DeviceOutOfMemory):
        meter.add(torch.zeros(2))


def test_profiles_come_from_the_disk_cache_the_second_time(monkeypatch, tmp_path) -> None:
    import smartsplit.models.profile as profile_module

    monkeypatch.setenv("SMARTSPLIT_CACHE", str(tmp_path))
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    first = profile_chain(model, (1, 8, 8), 5)
    assert list((tmp_path / "profiles").glob("units-*.json"))

    def no_forward(*args):
        raise AssertionError("profiled again instead of read from the cache")

    monkeypatch.setattr(profile_module, "_unit_rows", no_forward)
    assert profile_chain(model, (1, 8, 8), 5) == first
    with pytest.raises(AssertionError, match="profiled again"):
        profile_chain(model, (1, 8, 8), 6)  # another batch is another profile


def test_a_user_module_whose_code_changed_is_profiled_again(tmp_path, monkeypatch) -> None:
    import importlib.util
    import sys

    from smartsplit.models.profile import code_digest

    def load(forward: str) -> nn.Module:  # as a run would import it: the file as it is then
        path = tmp_path / "usermodel.py"
        path.write_text(f"from torch import nn\n\nclass Scale(nn.Module):\n    def forward(self, x):\n        {forward}\n")
        spec = importlib.util.spec_from_file_location("usermodel", path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "usermodel", module)
        spec.loader.exec_module(module)
        return nn.Sequential(module.Scale())

    before = load("return x * 2")
    digest = code_digest(before)
    after = load("return x * 3 + 0")  # the file edited between two runs
    assert repr(before) == repr(after)  # same structure: only the code tells them apart
    assert code_digest(after) != digest
    assert code_digest(nn.Sequential(nn.Linear(2, 2))) == code_digest(nn.Sequential(nn.Linear(3, 3)))
