"""A memory meter the model does not own: the live heap of a child process, counted below PyTorch.

The meter runs PyTorch in a child process with a small malloc counter preloaded (``heapmeter.c``, built once
with the system C compiler and cached). Every ``malloc``-family call of that process is counted by its usable
size: PyTorch's CPU tensors, oneDNN's and BLAS's scratch buffers, im2col columns, autograd's graph and saved
variables, the optimizer's state. What it does not see: memory mapped directly with ``mmap`` (Python's small-
object arenas, code and shared libraries, thread stacks) and heap fragmentation (freed memory the allocator
keeps). Those belong to the process's idle footprint, not to one training step; a device's budget is what it
may use above that footprint.

Two measurements, both with the same kernels training runs with (oneDNN on, the run's thread count):

- ``step_peak``: the peak of one steady-state device step (after warm-up steps): the device's units, their
  gradients and optimizer state, one micro-batch loaded at a time, forward to the cut under a checkpoint plan,
  the gradient of the cut activation coming back, backward, micro-batches accumulated, optimizer step. The
  edge is not in the process: the returned gradient is a fresh tensor of the cut activation's shape, as a link
  would deliver it. Bytes are counted above what the process held before the units were loaded.
- ``unit_costs``: per unit, alone, what its forward, backward and optimizer step need at one micro-batch size,
  the figures the memory model composes (``memory.model``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smartsplit.errors import SmartSplitError

SOURCE = Path(__file__).with_name("heapmeter.c")
SHIPPED = Path(__file__).with_name("shipped-profiles.json")
MEASUREMENT_VERSION = 5  # bump when what a measurement does changes, so cached figures are measured again
NAME = "heap meter (malloc counter preloaded into a child process; oneDNN on)"


class MeterUnavailable(SmartSplitError):
    """The meter cannot run on this machine (no C compiler, not Linux/glibc)."""


@dataclass(frozen=True)
class UnitCost:
    """What the meter saw one unit need, alone, at one micro-batch size (bytes above what was there before)."""

    static: int  # weights, gradients and optimizer state, with the unit's own bookkeeping
    grads: int  # of which gradients (freed at the start of every step)
    forward_peak: int  # highest during its forward: output, saved tensors and scratch
    forward_kept: int  # still held after its forward: output, saved tensors, autograd graph
    backward_first: int  # highest during its backward, above its saved tensors, the gradient of its output
    # included, when its parameters have no gradients yet (it allocates them)
    backward_accumulating: int  # the same when they have (it adds to them)
    backward_first_at_cut: int  # the same two when the unit is the last on the device: its output and the
    backward_accumulating_at_cut: int  # returned gradient are held by the step throughout, outside these figures
    checkpoint_kept: int  # held after its forward when it runs checkpointed: output, graph, the checkpoint's own
    optimizer_peak: int  # highest during the optimizer step, above weights, gradients and state


def cache_root() -> Path:
    """Where SmartSplit keeps what it built or measured: ``$SMARTSPLIT_CACHE``, else ``~/.cache/smartsplit``."""
    return Path(os.environ.get("SMARTSPLIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smartsplit")


def cached_json(folder: str, kind: str, key: Any, compute) -> Any:
    """``compute()``'s JSON-able value, kept in ``cache_root()/folder`` under a hash of ``key`` (written
    atomically; an unreadable or unwritable cache only costs computing again)."""
    text = json.dumps(key, default=str)
    path = cache_root() / folder / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"
    try:
        return json.loads(path.read_text())["value"]
    except (OSError, ValueError, KeyError):
        pass
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"key": text, "value": value}))
        os.replace(partial, path)
    except OSError:
        pass
    return value


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """The meter's C source, hashed: it names the built library and keys cached measurements."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def shim_path() -> Path:
    """The compiled malloc counter, built on first use into the cache folder."""
    if not sys.platform.startswith("linux"):
        raise MeterUnavailable(f"the memory meter needs Linux with glibc; this is {sys.platform}")
    cache = cache_root()
    target = cache / f"heapmeter-{source_digest()[:16]}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise MeterUnavailable("the memory meter builds a small C library and needs a C compiler: install gcc "
                               "(apt-get install gcc) or set CC")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MeterUnavailable(f"the memory meter cannot write its cache folder {cache}: {e.strerror}; set SMARTSPLIT_CACHE") from e
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(partial), str(SOURCE)], capture_output=True, text=True)
    if done.returncode != 0:
        raise MeterUnavailable(f"the memory meter's C library did not build with {compiler}: {done.stderr.strip()[:500]}")
    os.replace(partial, target)
    return target


class ShippedFigures:
    """The meter's figures for the shipped configs' models, measured once on one machine and shipped with the
    package (``meter/shipped-profiles.json``), so that runs plan from the same figures on every machine.

    Keyed like the disk cache but without the torch version and the meter's build: a figure is what a device
    step of that structure, shape and plan needs, wherever it is asked. ``scripts/ship_profiles.py`` regenerates
    the file (it records its command and the machine it ran on); figures of another ``MEASUREMENT_VERSION`` are
    never used.
    """

    def __init__(self, path: Path = SHIPPED) -> None:
        self.path = path
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        usable = data.get("measurement_version") == MEASUREMENT_VERSION
        self.figures: dict[str, Any] = data.get("figures", {}) if usable else {}
        self.machine: dict = data.get("machine", {})

    @staticmethod
    def key(kind: str, threads: int, structure_: str, request: dict) -> str:
        text = json.dumps([kind, MEASUREMENT_VERSION, threads, structure_, request], default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def get(self, key: str) -> Any:
        return self.figures.get(key)


class HeapMeter:
    """A child process that measures device steps; start it once, ask it many times, close it.

    ``threads`` is the torch thread count of the measured steps (memory of some kernels depends on it).
    Models travel to the child pickled, so a user model must be importable there (the parent's ``sys.path``
    is passed on).

    Measurements are cached on disk (``cache_root()/meter``), keyed by the model's structure (not its weights),
    the shapes, the plan, the optimizer, the thread count and the versions of torch and of the meter. The meter
    sees a few hundred bytes of Python's own allocations that vary from process to process; plans and reports
    built on cached figures are the same in every run on a machine, which keeps runs deterministic for a seed.
    ``cache=False`` measures afresh every time.

    With ``shipped`` (``ShippedFigures``), a figure shipped with the package is used instead of measuring: plans
    are then the same on every machine. ``sources`` counts the figures used by where they came from
    (``shipped``, or ``host``: measured on this machine).
    """

    def __init__(self, threads: int = 1, cache: bool = True, shipped: ShippedFigures | None = None) -> None:
        self.threads = threads
        self.cache = cache
        self.shipped = shipped
        # what records name as the meter of their peaks
        self.name = NAME if shipped is None else f"{NAME}; figures shipped with SmartSplit where it has them"
        self.sources: dict[tuple[str, str], str] = {}  # (kind, figure key) -> "shipped" or "host"
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> HeapMeter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step_peak(
        self,
        units,
        input_shape: tuple[int, ...],
        batch: int,
        *,
        micro_batch: int | None = None,
        segments: tuple[tuple[int, int], ...] = (),
        optimizer: tuple[str, float, float] = ("sgd", 0.01, 0.9),
        num_classes: int = 10,
        to_edge: bool = True,
    ) -> int:
        """Peak bytes of one steady-state device step of ``units`` (see the module's docstring).

        ``to_edge``: the output crosses to an edge and a gradient comes back; else ``units`` is the whole model
        and the loss is taken on the device.
        """
        request = dict(input_shape=tuple(input_shape), batch=batch, micro_batch=micro_batch or batch,
                       segments=tuple(tuple(s) for s in segments), optimizer=tuple(optimizer), num_classes=num_classes,
                       to_edge=to_edge)
        return self._cached("step", units, request, lambda: self._call("step_peak", blob=pickle.dumps(units), **request))

    def unit_costs(self, units, input_shape: tuple[int, ...], micro_batch: int,
                   optimizer: tuple[str, float, float] = ("sgd", 0.01, 0.9)) -> tuple[UnitCost, ...]:
        """Each unit of ``units`` measured alone at ``micro_batch`` (its input: the previous units' output)."""
        request = dict(input_shape=tuple(input_shape), micro_batch=micro_batch, optimizer=tuple(optimizer))
        rows = self._cached("units", units, request, lambda: self._call("unit_costs", blob=pickle.dumps(units), **request))
        return tuple(UnitCost(**row) for row in rows)

    def measure(self, callable_name: str, **kwargs) -> Any:
        """Run ``package.module:function`` in the child under the meter; it gets ``live``, ``peak`` and
        ``reset_peak`` callables first. For tests and one-off checks."""
        return self._call("custom", target=callable_name, kwargs=kwargs)

    def _cached(self, kind: str, units, request: dict, measure) -> Any:
        shape = structure(units)
        shipped_key = ShippedFigures.key(kind, self.threads, shape, request)
        if self.shipped is not None and (value := self.shipped.get(shipped_key)) is not None:
            self.sources[kind, shipped_key] = "shipped"
            return value
        self.sources[kind, shipped_key] = "host"
        if not self.cache:
            return measure()
        key = [kind, MEASUREMENT_VERSION, source_digest(), torch_version(), self.threads, shape, request]
        return cached_json("meter", kind, key, measure)

    def used(self) -> dict[str, int]:
        """How many distinct figures this meter has given, by source (``shipped``, ``host``)."""
        counts = {"shipped": 0, "host": 0}
        for source in self.sources.values():
            counts[source] += 1
        return counts

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
            self._proc = None

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ)
        env["LD_PRELOAD"] = str(shim_path())
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env["SMARTSPLIT_METER_THREADS"] = str(self.threads)
        # the child's stderr goes to a file, never a pipe nobody reads while it runs (a full pipe would stall it)
        self._stderr = tempfile.TemporaryFile()
        return subprocess.Popen([sys.executable, "-m", "smartsplit.meter.heap"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=self._stderr, env=env)

    def _call(self, op: str, **kwargs) -> Any:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        try:
            _send(self._proc.stdin, (op, kwargs))
            status, value = _receive(self._proc.stdout)
        except (OSError, EOFError, struct.error) as e:
            self._stderr.seek(0)
            err = self._stderr.read().decode(errors="replace")[-2000:]
            self._proc = None
            raise SmartSplitError(f"the memory meter's child process failed ({e}): {err.strip() or 'no output'}") from e
        if status != "ok":
            raise SmartSplitError(f"the memory meter could not measure: {value}")
        return value


def structure(units) -> str:
    """What identifies a model for memory: its modules and their settings, the shapes of its tensors, and for a
    traced model its code; never its weights' values."""
    from smartsplit.kernels.structure import channels_last

    tensors = [*units.named_parameters(), *units.named_buffers()]
    shapes = [(name, tuple(t.shape), str(t.dtype)) for name, t in tensors]
    code = "".join(getattr(m, "code", "") for m in units.modules() if hasattr(m, "graph"))
    laid_out = [name for name, t in tensors if channels_last(t)]  # named only when some are: older keys stand
    return f"{units!r}|{shapes}|{code}" + (f"|channels_last {laid_out}" if laid_out else "")


def torch_version() -> str:
    import torch

    return torch.__version__


def _send(stream, message: Any) -> None:
    data = pickle.dumps(message)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream) -> Any:
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("the meter's child process ended")
    (size,) = struct.unpack("<Q", head)
    return pickle.loads(stream.read(size))


# ---------------------------------------------------------------------------------------------------------
# the child process


class Heap:
    """The child's view of the malloc counter: ``live()`` and ``peak()`` bytes, ``reset_peak()``, and
    ``settle()`` before a baseline (see ``_rebuild_interned_strings``). What a measurement procedure gets."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(os.environ["LD_PRELOAD"])  # the preloaded copy: dlopen returns the same library
        lib.heapmeter_live.restype = ctypes.c_int64
        lib.heapmeter_peak.restype = ctypes.c_int64
        self.live, self.peak, self.reset_peak = lib.heapmeter_live, lib.heapmeter_peak, lib.heapmeter_reset_peak

    def settle(self) -> None:
        _rebuild_interned_strings(self)


def _rebuild_interned_strings(heap: Heap) -> None:
    """Make Python rebuild its table of interned strings now, so that it does not rebuild it inside a measurement.

    Every pybind11 call with keyword arguments interns a string that is freed after the call (checkpointing
    makes several such calls per segment). Freed entries use up the table's free slots, and once they are gone
    Python allocates a new table beside the old one (a few MB, and it can stay larger): a runtime cost that falls
    on whichever step runs out of slots, about once every 100,000 calls, whatever the model. Interning throw-away
    strings until that rebuild happens leaves the most free slots there can be before the measured steps.
    """
    start = heap.live()
    heap.reset_peak()
    for i in range(1 << 22):
        sys.intern(f"smartsplit-meter-{i}")  # freed at once: it only uses up a slot
        if i % 1024 == 1023 and heap.peak() - start > 65536:
            return


# What the parent's ``step_peak`` and ``unit_costs`` run in the child.
PROCEDURES = {"step_peak": "smartsplit.meter.procedures:step_peak", "unit_costs": "smartsplit.meter.procedures:unit_costs"}


def _procedure(target: str):
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _custom(heap: Heap, target: str, kwargs: dict) -> Any:
    return _procedure(target)(heap.live, heap.peak, heap.reset_peak, **kwargs)


def _serve() -> None:
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything the libraries print goes to stderr, never into the replies
    sys.stdout = sys.stderr
    import torch

    torch.set_num_threads(int(os.environ.get("SMARTSPLIT_METER_THREADS", "1")))
    heap = Heap()
    ops = {"custom": _custom, **{op: _procedure(target) for op, target in PROCEDURES.items()}}
    stdin = sys.stdin.buffer
    while True:
        try:
            op, kwargs = _receive(stdin)
        except EOFError:
            return
        try:
            reply = ("ok", ops[op](heap, **kwargs))
        except Exception as e:  # reported to the parent, which raises it there with its context
            reply = ("error", f"{type(e).__name__}: {e}")
        _send(out, reply)


if __name__ == "__main__":
    _serve()
