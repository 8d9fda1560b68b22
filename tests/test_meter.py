"""The memory meter against cases computed by hand, and the memory model against the meter."""

import math
import random

import pytest

from smartsplit.memory.model import activation_bytes, device_memory
from smartsplit.memory.ondevice import OnDeviceManager
from smartsplit.memory.planner import plan_segments
from smartsplit.models.profile import ProfileCache
from smartsplit.models.zoo import MODELS, build_model, default_input_shape

F32 = 4
SLACK = 4096  # what the allocator adds to a request: a chunk header and alignment


def test_meter_sees_a_linear_layer_by_hand(meter) -> None:
    batch, features = 64, 500
    seen = meter.measure("meter_cases:linear", batch=batch, features=features)
    out = batch * features * F32
    assert out <= seen["forward"] <= out + SLACK
    # backward makes the weight and bias gradients (the input needs none), and autograd's bookkeeping for one
    # backward call takes a few kB
    grads = (features * features + features) * F32
    assert grads <= seen["backward"] <= grads + 2 * SLACK


def test_meter_sees_the_im2col_buffer_of_a_native_convolution(meter) -> None:
    batch, cin, cout, side = 8, 16, 32, 32
    seen = meter.measure("meter_cases:conv", onednn=False, batch=batch, cin=cin, cout=cout, side=side)
    out = batch * cout * (side - 2) ** 2 * F32
    columns = batch * cin * 9 * (side - 2) ** 2 * F32  # unfolded input, one column per output pixel
    assert seen["out"] == out and out <= seen["kept"] <= out + SLACK
    assert out + columns <= seen["peak"] <= out + columns + SLACK


def test_meter_sees_onednn_scratch_that_tensors_do_not_show(meter) -> None:
    seen = meter.measure("meter_cases:conv", onednn=True, batch=8, cin=16, cout=32, side=32)
    assert seen["peak"] > seen["out"] + SLACK  # oneDNN's own buffers, not a tensor of PyTorch's


@pytest.fixture(scope="module")
def zoo_profiles(meter):
    return ProfileCache(meter)


SMALL = {"cnn": 0.5, "vgg11": 0.125, "vgg16": 0.125, "resnet18": 0.125, "mobilenetv2": 0.25}


@pytest.mark.parametrize("name", MODELS)
def test_memory_model_bounds_the_meter_within_ten_percent(name, meter, zoo_profiles) -> None:
    """Shallow, middle and whole-model cuts, whole batch and micro-batch 1, plain and with an optimal checkpoint
    plan (``benchmarks/memory_model.py`` runs every cut and micro-batch size at full width)."""
    model = build_model(name, width=SMALL[name])
    shape, batch, L = default_input_shape(name), 8, len(model)
    rows = []
    for micro in (batch, 1):
        profile = zoo_profiles.get(f"{name}-small", model, shape, micro)
        for cut in sorted({1, 3, L // 2, L}):
            plans = [()]
            segmentation = plan_segments(profile, cut, activation_bytes(profile, cut) // 2) if cut > 1 else None
            if segmentation is not None and segmentation.segments:
                plans.append(segmentation.segments)
            for segments in plans:
                predicted = device_memory(profile, cut, slots=1, segments=segments, micro_batches=math.ceil(batch / micro)).total
                measured = meter.step_peak(model[:cut], shape, batch, micro_batch=micro, segments=segments, to_edge=cut < L)
                rows.append((cut, micro, segments, predicted, measured))
    under = [r for r in rows if r[3] < r[4]]
    over = [r for r in rows if r[3] > 1.10 * r[4]]
    assert not under, f"predictions below the meter: {under}"
    assert not over, f"predictions more than 10% above the meter: {over}"


@pytest.mark.parametrize("name", MODELS)
def test_plans_for_random_budgets_fit_under_the_meter(name, meter, zoo_profiles) -> None:
    model = build_model(name, width=SMALL[name])
    shape, batch, L = default_input_shape(name), 8, len(model)
    manager = OnDeviceManager(lambda m: zoo_profiles.get(f"{name}-small", model, shape, m), batch, 1, 1e9, 0.01)
    whole = manager.plan(L, 2**62).peak_bytes
    smallest = manager.plan(1, 2**62).peak_bytes // 4  # below what cut 1 needs plainly: plans must shrink
    rng = random.Random(name)
    fitted = 0
    for _ in range(4):
        budget = int(math.exp(rng.uniform(math.log(smallest), math.log(whole))))
        plan = manager.deepest_fitting_cut(L, budget)
        if plan is None:
            continue
        fitted += 1
        measured = meter.step_peak(model[: plan.cut], shape, batch, micro_batch=plan.micro_batch, segments=plan.segments,
                                   to_edge=plan.cut < L)
        assert plan.peak_bytes <= budget
        assert measured <= budget, (budget, plan)
    assert fitted >= 2
