"""Shared test settings."""

import os
import tempfile

import pytest
import torch

# The memory meter's cache (and its compiled library) for this test session only: every session measures afresh,
# and runs within it (the CLI's subprocesses too) share the figures, as runs on one machine do.
os.environ["SMARTSPLIT_CACHE"] = tempfile.mkdtemp(prefix="smartsplit-test-cache-")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors: one intra-op thread is far faster than two fighting over a busy 2-core machine, and it is
    what runs use by default (``Config.threads``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def meter():
    """One memory-meter child process for the tests that measure (starting one costs a torch import)."""
    from smartsplit.meter.heap import HeapMeter, MeterUnavailable, shim_path

    try:
        shim_path()
    except MeterUnavailable as e:
        pytest.skip(f"the memory meter cannot run here: {e}")
    with HeapMeter(threads=1) as m:
        yield m
