"""A device's link emulated by the kernel: the device process in its own network namespace, joined to the host
by a veth pair, each end shaped with the ``tbf`` queueing discipline (the host's end at the device's downlink
rate, the device's end at its uplink rate). Needs root, ``ip`` and ``tc``; the kernel here has no ``netem``,
so a link's latency is added by the link layer (``link.ShapedLink`` with unbounded bandwidth).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from smartsplit.errors import SmartSplitError

MAX_DEVICES = 250  # one /30 per device in 10.231.0.0/16, the third octet its index


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise SmartSplitError(f"`{' '.join(args)}` failed: {done.stderr.strip()[:300]}")
    return done


@dataclass(frozen=True)
class DeviceNetwork:
    """One device's namespace and veth pair: start its process with ``wrap``; ``host_ip`` is where it finds its
    edge (listening on every address); ``remove`` takes it all down."""

    namespace: str
    host_if: str
    host_ip: str
    device_ip: str

    def wrap(self, command: list[str]) -> list[str]:
        """``command`` run in the namespace. ``nsenter`` enters only the network namespace; ``ip netns exec`` (where
        there is no nsenter) also remounts /sys, hiding the cgroups a device's memory limit needs."""
        if shutil.which("nsenter"):
            return ["nsenter", f"--net=/run/netns/{self.namespace}", *command]
        return ["ip", "netns", "exec", self.namespace, *command]

    def remove(self) -> None:
        _ip("ip", "link", "del", self.host_if, check=False)
        _ip("ip", "netns", "del", self.namespace, check=False)


def _tbf(rate_bytes_per_s: float) -> list[str]:
    """tbf at ``rate_bytes_per_s``: a burst of two full frames (or a tick's worth at fast rates), a queue that holds
    ten seconds of traffic rather than drop it (TCP would see losses the emulated link does not have)."""
    rate_bits = max(int(rate_bytes_per_s * 8), 8000)
    burst = max(2 * 1514, int(rate_bytes_per_s / 250))
    return ["root", "tbf", "rate", f"{rate_bits}bit", "burst", str(burst), "latency", "10s"]


def device_network(index: int, up_bytes_per_s: float, down_bytes_per_s: float, tag: str) -> DeviceNetwork:
    """Device ``index``'s namespace ``ss-<tag>-<index>``, joined to the host by a veth pair shaped both ways."""
    if not 0 <= index < MAX_DEVICES:
        raise SmartSplitError(f"kernel-shaped links take devices 0..{MAX_DEVICES - 1}, not {index}")
    net = DeviceNetwork(f"ss-{tag}-{index}", f"ssh{tag}{index}"[:15], f"10.231.{index}.1", f"10.231.{index}.2")
    device_if = f"ssd{tag}{index}"[:15]
    net.remove()  # a namespace left by a run that was killed
    try:
        _ip("ip", "netns", "add", net.namespace)
        _ip("ip", "link", "add", net.host_if, "type", "veth", "peer", "name", device_if)
        _ip("ip", "link", "set", device_if, "netns", net.namespace)
        _ip("ip", "addr", "add", f"{net.host_ip}/30", "dev", net.host_if)
        _ip("ip", "link", "set", net.host_if, "up")
        _ip("ip", "-n", net.namespace, "addr", "add", f"{net.device_ip}/30", "dev", device_if)
        _ip("ip", "-n", net.namespace, "link", "set", device_if, "up")
        _ip("ip", "-n", net.namespace, "link", "set", "lo", "up")
        _ip("tc", "qdisc", "add", "dev", net.host_if, *_tbf(down_bytes_per_s))
        _ip("ip", "netns", "exec", net.namespace, "tc", "qdisc", "add", "dev", device_if, *_tbf(up_bytes_per_s))
    except SmartSplitError:
        net.remove()
        raise
    return net


def network_unavailable() -> str | None:
    """None where this process can give a device a shaped namespace (root, ``ip``, ``tc``, veth and tbf), else a
    one-line reason. Tries for real: a probe namespace, made and removed."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (iproute2)"
    try:
        device_network(MAX_DEVICES - 1, 1e6, 1e6, "probe").remove()
    except (SmartSplitError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot make a shaped network namespace here ({str(exc)[:200]})"
    return None
