"""The time model, in one place: device compute, link transfers and edge compute of a split step (the engine's
simulated clock and the on-device manager's plan times both come from here)."""

from __future__ import annotations

from dataclasses import dataclass

from smartsplit.fleet import Device
from smartsplit.models.profile import BACKWARD_FLOPS, ModelProfile


@dataclass(frozen=True)
class EdgeSpec:
    flops_per_s: float
    latency_s: float  # per message, each way


@dataclass(frozen=True)
class StepTimes:
    """Seconds of one local step of a device at a cut, without queueing at the edge."""

    forward_s: float
    uplink_s: float
    edge_s: float
    downlink_s: float
    backward_s: float

    @property
    def total(self) -> float:
        return self.forward_s + self.uplink_s + self.edge_s + self.downlink_s + self.backward_s


def device_compute_s(profile: ModelProfile, cut: int, flops_per_s: float, scale: float = 1.0) -> float:
    """Seconds of a device's forward and backward through units 1..cut, for ``scale`` times the profiled batch."""
    return (1 + BACKWARD_FLOPS) * profile.flops(1, cut) * scale / flops_per_s


def recompute_s(recompute_flops: float, flops_per_s: float, scale: float = 1.0) -> float:
    """Seconds a device spends recomputing checkpointed activations (``recompute_flops`` per profiled batch)."""
    return recompute_flops * scale / flops_per_s


def transfer_s(nbytes: int, bytes_per_s: float, latency_s: float) -> float:
    return latency_s + nbytes / bytes_per_s if nbytes else 0.0


def step_times(
    profile: ModelProfile,
    cut: int,
    device: Device,
    edge: EdgeSpec,
    scale: float = 1.0,
    recompute_flops: float = 0.0,
    round_trips: int = 1,
) -> StepTimes:
    """Times of one step carrying ``scale`` times the profiled batch (a short last batch: less than 1).

    ``recompute_flops`` (for the whole step) lengthens the device's backward; each of ``round_trips``
    micro-batches pays the link latency both ways.
    """
    device_flops = profile.flops(1, cut) * scale
    edge_flops = profile.flops(cut + 1, profile.num_units) * scale
    crossing = int(profile.cut_bytes(cut) * scale)
    latency = edge.latency_s * round_trips
    return StepTimes(
        forward_s=device_flops / device.flops_per_s,
        uplink_s=transfer_s(crossing, device.uplink_bytes_per_s, latency),
        edge_s=(1 + BACKWARD_FLOPS) * edge_flops / edge.flops_per_s,
        downlink_s=transfer_s(crossing, device.downlink_bytes_per_s, latency),
        backward_s=(BACKWARD_FLOPS * device_flops + recompute_flops * scale) / device.flops_per_s,
    )


def model_transfer_s(profile: ModelProfile, cut: int, device: Device, edge: EdgeSpec) -> tuple[float, float]:
    """Seconds to download the device's units at round start and upload them at round end."""
    nbytes = profile.param_bytes(1, cut)
    return (
        transfer_s(nbytes, device.downlink_bytes_per_s, edge.latency_s),
        transfer_s(nbytes, device.uplink_bytes_per_s, edge.latency_s),
    )
