"""Memory budgets for a device process on Linux: how much memory is free now, and a kernel-enforced limit.

``available_memory()`` is what the OS says a process may still take (MemAvailable, or less where a cgroup
memory limit leaves less room). ``AvailableMemoryTrace`` and ``FixedBudget`` are budget traces (they duck-type
``smartsplit.fleet.BudgetTrace``) for a device that runs for real. ``enforce_budget()`` puts a process in a child
memory cgroup under this process's own one (cgroup v2 where its memory controller is enabled, else cgroup v1),
so that the kernel kills it when it goes over; ``idle_footprint()`` is what a process holds before it starts
work: the limit a device runs under is its idle footprint plus its budget.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from smartsplit.errors import SmartSplitError

_MEMINFO = Path("/proc/meminfo")


# ---------------------------------------------------------------- reading the OS


def _read_int(path: Path) -> int | None:
    """An integer file (``max`` and missing files give None)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.lstrip("-").isdigit() else None


def _keyed(path: Path, key: str) -> int | None:
    """The number after ``key`` in a ``key value`` file (memory.events, memory.oom_control, status...)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return None


def _meminfo(key: str) -> int:
    try:
        text = _MEMINFO.read_text()
    except OSError as exc:
        raise SmartSplitError(f"cannot read {_MEMINFO} ({exc.strerror or exc}): memory budgets need Linux") from None
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            return int(rest.split()[0]) * 1024
    raise SmartSplitError(f"{_MEMINFO} has no {key} line (Linux 3.14 or later needed)")


@dataclass(frozen=True)
class _Cgroup:
    """This process's memory cgroup: its folder, the folder of the hierarchy's root, and the cgroup version."""

    path: Path
    mount: Path
    version: int


def _mounts() -> list[tuple[str, Path, str, str]]:
    """(root within the hierarchy, mount point, fs type, super options) of each cgroup mount."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    mounts = []
    for line in lines:
        pre, _, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            mounts.append((fields[3], Path(fields[4].replace("\\040", " ")), tail[0], tail[2]))
    return mounts


def _own_cgroup(controller: str = "memory") -> _Cgroup | None:
    """This process's cgroup for ``controller`` (memory, cpu): v2 if the controller is enabled there, else v1;
    None if neither."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    v1_path = v2_path = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            v2_path = path
        elif controller in controllers.split(","):
            v1_path = path
    found = {}
    for root, point, fstype, options in _mounts():
        if fstype == "cgroup2" and v2_path is not None:
            found.setdefault(2, (_under(point, root, v2_path), point))
        elif fstype == "cgroup" and v1_path is not None and controller in options.split(","):
            found.setdefault(1, (_under(point, root, v1_path), point))
    if 2 in found:
        path, mount = found[2]
        try:
            if controller in (path / "cgroup.controllers").read_text().split():
                return _Cgroup(path, mount, 2)
        except OSError:
            pass
    if 1 in found:
        path, mount = found[1]
        return _Cgroup(path, mount, 1)
    return None


def _under(point: Path, root: str, path: str) -> Path:
    """The folder of cgroup ``path`` in a hierarchy whose ``root`` is mounted at ``point``."""
    rel = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
    if rel.startswith(".."):  # the mount shows another part of the tree (a container): use what it shows
        rel = ""
    return point / rel if rel not in ("", ".") else point


def _room(group: _Cgroup) -> int | None:
    """Bytes left under the tightest memory limit on the way from ``group`` up to its hierarchy's root."""
    limit_file, usage_file = ("memory.max", "memory.current") if group.version == 2 else (
        "memory.limit_in_bytes", "memory.usage_in_bytes")
    room = None
    folder = group.path
    while True:
        limit, usage = _read_int(folder / limit_file), _read_int(folder / usage_file)
        if limit is not None and usage is not None:
            left = max(limit - usage, 0)
            room = left if room is None else min(room, left)
        if folder == group.mount or folder == folder.parent:
            return room
        folder = folder.parent


def available_memory() -> int:
    """Bytes this process may still take: MemAvailable, or the room under a lower cgroup memory limit."""
    available = _meminfo("MemAvailable")
    group = _own_cgroup()
    room = _room(group) if group is not None else None
    return available if room is None else min(available, room)


def idle_footprint(pid: int | None = None) -> int:
    """The resident set (VmRSS) of process ``pid`` (default: this one) now, bytes."""
    status = Path(f"/proc/{os.getpid() if pid is None else pid}/status")
    if not status.exists():
        raise SmartSplitError(f"no {status}: no such process, or not Linux")
    rss = _keyed(status, "VmRSS")
    if rss is None:
        raise SmartSplitError(f"{status} has no VmRSS line (a kernel thread, or the process has exited)")
    return rss * 1024


# ---------------------------------------------------------------- budget traces


class AvailableMemoryTrace:
    """The budget is whatever the OS says is available now (``available_memory()``); times are ignored."""

    def at(self, t: float) -> int:
        return available_memory()

    def next_change(self, t: float) -> float | None:
        """Never known in advance: None."""
        return None

    def min_over(self, t0: float, t1: float) -> int:
        """No history is kept: the budget now."""
        return available_memory()

    def quantile(self, q: float, t0: float, t1: float) -> int:
        """No history is kept: the budget now."""
        return available_memory()


@dataclass(frozen=True)
class FixedBudget:
    """A budget of ``bytes`` that never changes."""

    bytes: int

    def __post_init__(self) -> None:
        if int(self.bytes) < 0:
            raise SmartSplitError(f"a budget must be >= 0 bytes, got {self.bytes}")
        object.__setattr__(self, "bytes", int(self.bytes))

    def at(self, t: float) -> int:
        return self.bytes

    def next_change(self, t: float) -> float | None:
        return None

    def min_over(self, t0: float, t1: float) -> int:
        return self.bytes

    def quantile(self, q: float, t0: float, t1: float) -> int:
        return self.bytes


# ---------------------------------------------------------------- enforcement


# per controller and cgroup version: the file a child's limit is written to, and a harmless value to try
_LIMIT_FILES = {("memory", 2): ("memory.max", str(1 << 40)), ("memory", 1): ("memory.limit_in_bytes", str(1 << 40)),
                ("cpu", 2): ("cpu.max", "max 100000"), ("cpu", 1): ("cpu.cfs_quota_us", "-1")}


def _usable_cgroup(controller: str = "memory") -> tuple[_Cgroup | None, str | None]:
    """This process's cgroup for ``controller`` where children with a limit can be made in it, else a reason."""
    if not sys.platform.startswith("linux"):
        return None, f"not Linux ({sys.platform}): kernel {controller} limits need Linux cgroups"
    group = _own_cgroup(controller)
    if group is None:
        return None, f"no cgroup {controller} controller is mounted (neither cgroup v2 with {controller} nor v1 {controller})"
    if not os.access(group.path, os.W_OK):
        who = "not running as root and " if os.geteuid() != 0 else ""
        return None, f"{who}cgroup folder {group.path} is not writable"
    if group.version == 2:
        control = group.path / "cgroup.subtree_control"
        try:
            if controller not in control.read_text().split():
                control.write_text(f"+{controller}")
        except OSError as exc:
            return None, (f"cannot enable the {controller} controller for children of {group.path} "
                          f"({exc.strerror or exc}; a cgroup v2 folder that holds processes cannot)")
    probe = group.path / f"smartsplit-probe-{os.getpid()}"
    name, value = _LIMIT_FILES[controller, group.version]
    try:
        probe.mkdir(exist_ok=True)
        try:
            limit_file = probe / name
            if not limit_file.exists():
                return None, f"a child cgroup of {group.path} has no {limit_file.name}"
            limit_file.write_text(value)
        finally:
            probe.rmdir()
    except OSError as exc:
        return None, f"cannot create a child {controller} cgroup in {group.path} ({exc.strerror or exc})"
    return group, None


def enforcement_unavailable() -> str | None:
    """None where this process can put a process under a kernel memory limit, else a one-line reason.

    Tries for real: creates a probe child cgroup, sets its limit, and removes it.
    """
    return _usable_cgroup()[1]


@dataclass(frozen=True)
class MemoryLimit:
    """A child memory cgroup with a limit (``limit``, bytes as the kernel holds it) at ``path``."""

    path: Path
    limit: int
    version: int
    base: int = 0  # bytes charged here when the process came in (``enforce_budget(..., above_usage=True)``)

    def usage(self) -> int | None:
        """Bytes charged to this cgroup now."""
        return _read_int(self.path / ("memory.current" if self.version == 2 else "memory.usage_in_bytes"))

    def oom_kills(self) -> int:
        """Processes the kernel killed here for going over the limit.

        cgroup v2: ``oom_kill`` of memory.events. cgroup v1: the ``oom_kill`` line of memory.oom_control
        (Linux 4.13+); on older kernels, a best effort: memory.failcnt, how often usage hit the limit, which
        also counts hits the kernel resolved by reclaiming memory without a kill.
        """
        if self.version == 2:
            return _keyed(self.path / "memory.events", "oom_kill") or 0
        kills = _keyed(self.path / "memory.oom_control", "oom_kill")
        return kills if kills is not None else (_read_int(self.path / "memory.failcnt") or 0)

    def peak(self) -> int | None:
        """The most memory used here, bytes (v2: memory.peak, None where absent; v1: memory.max_usage_in_bytes)."""
        return _read_int(self.path / ("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"))

    def resize(self, limit_bytes: int, base: int | None = None) -> MemoryLimit:
        """The same cgroup with its limit set to ``limit_bytes`` (swap included where v1 counts it), in place: the
        process stays where it is, so the limit is never nested under an older one. ``base``: its new idle
        footprint (default: unchanged)."""
        if int(limit_bytes) <= 0:
            raise SmartSplitError(f"a memory limit must be > 0 bytes, got {limit_bytes}")
        if self.version == 2:
            limit_file, swap_file, swap_value = self.path / "memory.max", self.path / "memory.swap.max", "0"
        else:
            limit_file, swap_file = self.path / "memory.limit_in_bytes", self.path / "memory.memsw.limit_in_bytes"
            swap_value = str(int(limit_bytes))
        try:
            if self.version == 1 and swap_file.exists():
                swap_file.write_text("-1")  # memsw may not go below the memory limit: lift it before lowering that
            limit_file.write_text(str(int(limit_bytes)))
            if swap_file.exists():
                swap_file.write_text(swap_value)
        except OSError as exc:
            raise SmartSplitError(f"cannot set the memory limit of {self.path} to {int(limit_bytes)} bytes "
                                  f"({exc.strerror or exc})") from None
        return replace(self, limit=_read_int(limit_file) or int(limit_bytes),
                                   base=self.base if base is None else base)

    def reset_peak(self) -> bool:
        """Start ``peak`` afresh from the usage now (v1: max_usage_in_bytes; v2: memory.peak, Linux 6.12+); False
        where the kernel cannot, so ``peak`` still counts from earlier."""
        try:
            (self.path / ("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes")).write_text("0")
            return True
        except OSError:
            return False

    def leave(self, pid: int | None = None) -> None:
        """Move process ``pid`` (default: this one) back to the parent cgroup, then remove this one."""
        with contextlib.suppress(OSError):
            (self.path.parent / "cgroup.procs").write_text(str(os.getpid() if pid is None else int(pid)))
        with contextlib.suppress(OSError):
            self.remove()

    def remove(self) -> None:
        """Remove the cgroup once its processes are gone; moves no process out. A cgroup still busy stays."""
        for _ in range(20):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                time.sleep(0.05)


def enforce_budget(limit_bytes: int, pid: int | None = None, name: str | None = None,
                   above_usage: bool = False) -> MemoryLimit:
    """Put process ``pid`` (default: this one) under a kernel memory limit of ``limit_bytes``, swap included.

    Creates (or reuses) the child cgroup ``smartsplit-<name or pid>`` of this process's own memory cgroup, sets
    its limit (v2: memory.max and memory.swap.max=0; v1: memory.limit_in_bytes and memory.memsw.limit_in_bytes,
    where present) and moves ``pid`` into it. The kernel charges a cgroup only what its processes allocate
    after they join (v2, and v1 unless memory.move_charge_at_immigrate moves their pages along, which is asked
    for where it exists): with ``above_usage`` the limit is ``limit_bytes`` above what is charged to the cgroup
    once the process is in, so a budget means memory the process may take beyond what it holds now.
    """
    if int(limit_bytes) <= 0:
        raise SmartSplitError(f"a memory limit must be > 0 bytes, got {limit_bytes}")
    pid = os.getpid() if pid is None else int(pid)
    label = str(pid) if name is None else str(name)
    if not label or "/" in label or label in (".", ".."):
        raise SmartSplitError(f"bad cgroup name {name!r}: needs a non-empty name without '/'")
    group, reason = _usable_cgroup()
    if group is None:
        raise SmartSplitError(f"cannot enforce a memory budget: {reason}")
    path = group.path / f"smartsplit-{label}"
    if group.version == 2:
        limit_file, swap_file = path / "memory.max", path / "memory.swap.max"
        swap_value = "0"
    else:
        limit_file, swap_file = path / "memory.limit_in_bytes", path / "memory.memsw.limit_in_bytes"
        swap_value = str(int(limit_bytes))
    try:
        path.mkdir(exist_ok=True)
        if group.version == 1 and swap_file.exists():
            swap_file.write_text("-1")  # memsw may not go below the memory limit: lift it before lowering that
        base = 0
        if above_usage:
            limit_file.write_text("max" if group.version == 2 else "-1")
            immigrate = path / "memory.move_charge_at_immigrate"
            if group.version == 1 and immigrate.exists():
                with contextlib.suppress(OSError):
                    immigrate.write_text("3")
            (path / "cgroup.procs").write_text(str(pid))
            base = _read_int(path / ("memory.current" if group.version == 2 else "memory.usage_in_bytes")) or 0
            limit_bytes = base + int(limit_bytes)
            if swap_file.exists() and group.version == 1:
                swap_value = str(int(limit_bytes))
        limit_file.write_text(str(int(limit_bytes)))
        if swap_file.exists():
            swap_file.write_text(swap_value)
        (path / "cgroup.procs").write_text(str(pid))
    except OSError as exc:
        with contextlib.suppress(OSError):
            MemoryLimit(path, 0, group.version).remove()
        reason = exc.strerror or exc
        raise SmartSplitError(f"cannot put process {pid} under a memory limit in {path} ({reason})") from None
    return MemoryLimit(path, _read_int(limit_file) or int(limit_bytes), group.version, base)


# ---------------------------------------------------------------- CPU


CPU_PERIOD_US = 100_000  # the scheduler period a quota is given in (the kernel's default)


def cpu_quota_unavailable() -> str | None:
    """None where this process can put a process under a CPU quota (a child cgroup of its own cpu cgroup, v2
    ``cpu.max`` or v1 ``cpu.cfs_quota_us``), else a one-line reason. Tries for real, like ``enforcement_unavailable``."""
    return _usable_cgroup("cpu")[1]


@dataclass(frozen=True)
class CpuQuota:
    """A child cpu cgroup at ``path`` letting its processes run ``share`` of one core (a quota per period)."""

    path: Path
    share: float

    def remove(self) -> None:
        """Remove the cgroup once its processes have exited (a cgroup still holding one stays)."""
        with contextlib.suppress(OSError):
            self.path.rmdir()


def limit_cpu(pid: int, share: float, name: str) -> CpuQuota:
    """Put process ``pid`` (all its threads, and children it starts later) under a CPU quota of ``share`` of one
    core: at most ``share * CPU_PERIOD_US`` microseconds of CPU time every period, enforced by the scheduler."""
    if not 0 < share <= 64:
        raise SmartSplitError(f"a CPU share must be in (0, 64] cores, got {share}")
    if not name or "/" in name or name in (".", ".."):
        raise SmartSplitError(f"bad cgroup name {name!r}: needs a non-empty name without '/'")
    group, reason = _usable_cgroup("cpu")
    if group is None:
        raise SmartSplitError(f"cannot set a CPU quota: {reason}")
    quota = max(int(share * CPU_PERIOD_US), 1000)  # the kernel's least quota is 1 ms
    path = group.path / f"smartsplit-{name}"
    try:
        path.mkdir(exist_ok=True)
        if group.version == 2:
            (path / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
        else:
            (path / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            (path / "cpu.cfs_quota_us").write_text(str(quota))
        (path / "cgroup.procs").write_text(str(int(pid)))
    except OSError as exc:
        raise SmartSplitError(f"cannot put process {pid} under a CPU quota in {path} ({exc.strerror or exc})") from None
    return CpuQuota(path, quota / CPU_PERIOD_US)
