"""Memory budgets for a device process: what the OS says is free, budget traces, and kernel-enforced limits."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from smartsplit.deploy import limits
from smartsplit.deploy.limits import (
    AvailableMemoryTrace,
    FixedBudget,
    available_memory,
    enforce_budget,
    enforcement_unavailable,
    idle_footprint,
)
from smartsplit.errors import SmartSplitError

MB = 2**20
UNAVAILABLE = enforcement_unavailable()
needs_enforcement = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")

# Waits for a line on stdin (sent once it is under its limit), then takes up to TOTAL MB, 50 MB at a time,
# touching every page so that the memory is really used.
CHILD = """
import sys
total = int(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
chunks = []
for _ in range(total // 50):
    b = bytearray(50 * 2**20)
    b[::4096] = b"\\1" * len(range(0, len(b), 4096))
    chunks.append(b)
print("done", flush=True)
"""


def _meminfo_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal")


def test_available_memory_is_positive_and_at_most_total():
    assert 0 < available_memory() <= _meminfo_total()


def test_available_memory_needs_meminfo(monkeypatch, tmp_path):
    monkeypatch.setattr(limits, "_MEMINFO", tmp_path / "no-meminfo")
    with pytest.raises(SmartSplitError, match="Linux"):
        available_memory()


def test_fixed_budget():
    budget = FixedBudget(300 * MB)
    assert budget.at(0.0) == budget.at(1e6) == 300 * MB
    assert budget.next_change(0.0) is None
    assert budget.min_over(0.0, 10.0) == budget.quantile(0.5, 0.0, 10.0) == 300 * MB
    with pytest.raises(SmartSplitError):
        FixedBudget(-1)


def test_available_memory_trace_reads_the_os():
    trace = AvailableMemoryTrace()
    assert 0 < trace.at(0.0) <= _meminfo_total()
    assert 0 < trace.at(123.0) <= _meminfo_total()
    assert trace.next_change(0.0) is None


def test_idle_footprint():
    assert idle_footprint() > 0
    assert idle_footprint(os.getpid()) > 0
    with pytest.raises(SmartSplitError):
        idle_footprint(2**22 + 12345)  # above the default pid_max


def test_enforce_budget_rejects_bad_names_and_limits():
    with pytest.raises(SmartSplitError):
        enforce_budget(100 * MB, pid=os.getpid(), name="a/b")
    with pytest.raises(SmartSplitError):
        enforce_budget(0, pid=os.getpid(), name="zero")


@pytest.mark.skipif(UNAVAILABLE is None, reason="memory limits can be enforced here")
def test_enforce_budget_says_why_not():
    with pytest.raises(SmartSplitError, match="cannot enforce"):
        enforce_budget(100 * MB, pid=os.getpid(), name="unavailable")


def _run_limited(total_mb: int, budget_mb: int, name: str):
    """A child under idle footprint + ``budget_mb`` that then takes ``total_mb``: its returncode, the limit, its
    OOM kills (None where no such counter: v1 counts them in memory.oom_control or memory.failcnt) and its peak."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(total_mb)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    limit = None
    try:
        assert child.stdout.readline().strip() == "ready"
        limit = enforce_budget(idle_footprint(child.pid) + budget_mb * MB, pid=child.pid, name=name)
        assert str(child.pid) in (limit.path / "cgroup.procs").read_text().split()
        child.communicate("go\n", timeout=120)
        has_counter = limit.version == 1 or "oom_kill" in (limit.path / "memory.events").read_text()
        return child.returncode, limit, limit.oom_kills() if has_counter else None, limit.peak()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if limit is not None:
            limit.remove()
            assert not limit.path.exists()


@needs_enforcement
def test_child_over_its_limit_is_killed():
    returncode, limit, kills, peak = _run_limited(400, 100, f"test-over-{os.getpid()}")
    assert returncode == -9
    if kills is not None:
        assert kills >= 1
    if peak is not None:
        assert peak <= limit.limit


@needs_enforcement
def test_child_under_its_limit_finishes():
    returncode, limit, kills, _ = _run_limited(50, 100, f"test-under-{os.getpid()}")
    assert returncode == 0
    assert kills in (None, 0)


# ---------------------------------------------------------------- CPU quotas

CPU_UNAVAILABLE = limits.cpu_quota_unavailable()

# Waits for a line on stdin (sent once it is under its quota), then spins until it has used SECONDS of CPU time.
SPIN = """
import sys, time
seconds = float(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
start = time.process_time()
while time.process_time() - start < seconds:
    pass
print("done", flush=True)
"""


@pytest.mark.skipif(CPU_UNAVAILABLE is not None, reason=CPU_UNAVAILABLE or "")
@pytest.mark.parametrize("share", [0.2, 0.5])
def test_a_process_under_a_cpu_quota_takes_as_long_as_the_quota_says(share: float) -> None:
    """0.3 s of CPU work under a quota of ``share`` of a core takes about 0.3 / share seconds of wall time (the
    scheduler throttles it per 100 ms period: within a period or so, and a busy machine only adds)."""
    import time

    work_s = 0.3
    child = subprocess.Popen([sys.executable, "-c", SPIN, str(work_s)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    quota = None
    try:
        assert child.stdout.readline().strip() == "ready"
        quota = limits.limit_cpu(child.pid, share, name=f"test-cpu-{child.pid}")
        assert quota.share == pytest.approx(share)
        started = time.monotonic()
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
        wall = time.monotonic() - started
    finally:
        child.kill()
        child.wait()
        if quota is not None:
            quota.remove()
    expected = work_s / share
    assert expected - 0.1 <= wall <= 2.0 * expected + 0.3, (wall, expected)


def test_cpu_quotas_refuse_bad_shares_and_names() -> None:
    with pytest.raises(SmartSplitError, match="CPU share"):
        limits.limit_cpu(os.getpid(), 0.0, name="zero")
    with pytest.raises(SmartSplitError, match="cgroup name"):
        limits.limit_cpu(os.getpid(), 0.5, name="a/b")


@needs_enforcement
def test_a_budget_change_resizes_the_limit_in_place_never_nesting_a_cgroup():
    """A device's limit follows its budget trace: each change rewrites the same cgroup's limit, so a budget that
    comes back is a limit that comes back (a cgroup nested under an old, lower one would keep the lower)."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    limit = None
    try:
        assert child.stdout.readline().strip() == "ready"
        limit = enforce_budget(400 * MB, pid=child.pid, name=f"test-resize-{child.pid}")
        where = Path(f"/proc/{child.pid}/cgroup").read_text()
        low = limit.resize(300 * MB, base=7)
        high = low.resize(500 * MB)
        assert (low.limit, high.limit) == (300 * MB, 500 * MB) and low.base == high.base == 7
        assert high.path == limit.path and Path(f"/proc/{child.pid}/cgroup").read_text() == where
        assert not any(p.is_dir() for p in limit.path.iterdir())  # no child cgroup made under it
    finally:
        child.kill()
        child.wait()
        if limit is not None:
            limit.remove()
