"""Device profiles learned from what devices measured (``fleet.profiles: learned``).

The central server starts from the catalog's figures and moves, device by device, to running estimates from
their reports (from each device's second finished round: its first carries its start-up): each report's round time (without the edge queue and pauses, which are not the device's speed)
over the clock model's prediction for that device at that cut gives a slowness factor, smoothed over rounds; the
device is then planned as its catalog record with its compute speed and link bandwidths divided by that factor.
In the simulator the factor stays 1 (the reports are the clock model's own times); on a testbed or real devices
it absorbs whatever the catalog got wrong (a slower core, a busier link, the calls between device and edge).
"""

from __future__ import annotations

import dataclasses

from smartsplit.fleet import Device
from smartsplit.records import DeviceReport

SMOOTHING = 0.5  # weight of the newest measurement in the running estimate


@dataclasses.dataclass
class LearnedProfiles:
    """Each device's slowness factor (measured over predicted round time), 1 until it has reported."""

    factors: dict[int, float] = dataclasses.field(default_factory=dict)
    started: set[int] = dataclasses.field(default_factory=set)  # devices whose first round has been seen

    def device(self, catalog: Device) -> Device:
        """The device as planning sees it: the catalog's record, slowed by its learned factor."""
        factor = self.factors.get(catalog.id)
        if factor is None:
            return catalog
        return dataclasses.replace(catalog, flops_per_s=catalog.flops_per_s / factor,
                                   uplink_bytes_per_s=catalog.uplink_bytes_per_s / factor,
                                   downlink_bytes_per_s=catalog.downlink_bytes_per_s / factor)

    def learn(self, reports: list[DeviceReport], predicted_round_s: dict[int, float]) -> None:
        """Move each device that finished its round toward what it measured (``predicted_round_s``: the clock
        model's round time of each device at its assigned cut, as the round was planned)."""
        for report in reports:
            predicted = predicted_round_s.get(report.device)
            if report.dropped_out or not report.steps or report.cut != report.final_cut or not predicted:
                continue  # a partial round, or one whose cut moved, says nothing clean about the device's speed
            if report.device not in self.started:  # its first round carries its start-up (code run once, first
                self.started.add(report.device)    # allocations): it would read as a device many times slower
                continue
            measured = report.finish_s - report.wait_s - report.paused_s
            if measured <= 0:
                continue
            previous = self.factors.get(report.device, 1.0)
            # the prediction was made with the previous factor: the new one is relative to the catalog
            observed = previous * measured / predicted
            self.factors[report.device] = (1 - SMOOTHING) * previous + SMOOTHING * observed

    def state_dict(self) -> dict:
        return {"factors": {str(k): v for k, v in self.factors.items()}, "started": sorted(self.started)}

    def load_state_dict(self, state: dict) -> None:
        self.factors = {int(k): float(v) for k, v in state.get("factors", {}).items()}
        self.started = {int(d) for d in state.get("started", [])}
