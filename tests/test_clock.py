"""The simulated clock against timelines worked out by hand."""

from __future__ import annotations

import pytest
from test_engine import BATCH, SGD, SHAPE, batches, chain, dataset, part, play_round

from smartsplit.fleet import Device
from smartsplit.fleet.clock import EdgeSpec
from smartsplit.models.profile import profile_chain

EDGE = EdgeSpec(flops_per_s=1e6, latency_s=0.05)  # slow enough that the edge matters
CUT = 1


def timeline(profile, cut, dev, edge, steps):
    """Hand-computed figures of a lone device: every phase one after another, no waiting."""
    f_dev = profile.flops(1, cut)
    f_edge = profile.flops(cut + 1, profile.num_units)
    act = profile.unit(cut).output_bytes
    params = profile.param_bytes(1, cut)
    download = edge.latency_s + params / dev.downlink_bytes_per_s
    upload = edge.latency_s + params / dev.uplink_bytes_per_s
    forward, backward = f_dev / dev.flops_per_s, 2 * f_dev / dev.flops_per_s
    up, down = edge.latency_s + act / dev.uplink_bytes_per_s, edge.latency_s + act / dev.downlink_bytes_per_s
    at_edge = 3 * f_edge / edge.flops_per_s
    return {
        "finish": download + steps * (forward + up + at_edge + down + backward) + upload,
        "compute": steps * (forward + backward),
        "comm": download + upload + steps * (up + down),
        "edge": at_edge,
    }


def run(parts, edge=EDGE):
    model, data = chain(), dataset()
    groups, reports, _ = play_round(model, parts(model), data, profile_chain(model, SHAPE, BATCH), [edge], SGD)
    return reports


def test_one_device_timeline():
    dev = Device(0, "test", 10**9, 2e5, 4e4, 8e4)
    model = chain()
    expected = timeline(profile_chain(model, SHAPE, BATCH), CUT, dev, EDGE, steps=3)
    (r,) = run(lambda m: [part(m, dev, CUT, 10**9, batches(BATCH, BATCH, BATCH))])
    assert r["finish_s"] == pytest.approx(expected["finish"])
    assert r["compute_s"] == pytest.approx(expected["compute"])
    assert r["comm_s"] == pytest.approx(expected["comm"])
    assert r["wait_s"] == 0


def test_two_devices_contend_for_one_edge():
    """Both reach the edge together: the second waits one edge service, then they stay staggered."""
    devs = [Device(i, "test", 10**9, 2e5, 4e4, 8e4) for i in range(2)]
    model = chain()
    expected = timeline(profile_chain(model, SHAPE, BATCH), CUT, devs[0], EDGE, steps=2)
    first, second = run(lambda m: [part(m, d, CUT, 10**9, batches(BATCH, BATCH, start=16 * d.id)) for d in devs])
    assert first["wait_s"] == 0
    assert second["wait_s"] == pytest.approx(expected["edge"])
    assert first["finish_s"] == pytest.approx(expected["finish"])
    assert second["finish_s"] == pytest.approx(expected["finish"] + expected["edge"])


def test_slow_link_only_lengthens_communication():
    fast = Device(0, "test", 10**9, 2e5, 4e4, 8e4)
    slow = Device(1, "test", 10**9, 2e5, 1e4, 2e4)  # a quarter of the bandwidth both ways
    model = chain()
    profile = profile_chain(model, SHAPE, BATCH)
    (r_fast,) = run(lambda m: [part(m, fast, CUT, 10**9, batches(BATCH, BATCH))])
    (r_slow,) = run(lambda m: [part(m, slow, CUT, 10**9, batches(BATCH, BATCH))])
    assert r_slow["compute_s"] == pytest.approx(r_fast["compute_s"])
    bytes_part = r_fast["comm_s"] - 2 * 2 * EDGE.latency_s - 2 * EDGE.latency_s  # 2 steps x 2 messages + 2 model transfers
    assert r_slow["comm_s"] - r_fast["comm_s"] == pytest.approx(3 * bytes_part)
    assert r_slow["finish_s"] == pytest.approx(timeline(profile, CUT, slow, EDGE, steps=2)["finish"])
