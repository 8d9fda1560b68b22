"""Which machine a figure came from, and which of its traits decide how floating-point kernels round.

PyTorch (ATen's vectorised kernels, oneDNN, the BLAS) and numpy each pick their kernels from the CPU's
instruction sets at run time, and kernels of different widths sum in different orders. Two machines give
bit-identical floats only where all of ``kernel_fingerprint()`` agrees; a forced capability
(``ATEN_CPU_CAPABILITY``) pins ATen's kernels alone, so the variables that pin the others are part of it too.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache

# instruction-set flags (as /proc/cpuinfo names them) that some kernel of torch, oneDNN, the BLAS or numpy
# dispatches on
_KERNEL_FLAGS = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512cd", "avx512bw", "avx512dq",
                 "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16",
                 "amx_int8", "asimd", "asimddp", "sve", "sve2", "bf16", "i8mm")
# variables that pin what a library dispatches to
_PINS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
         "NPY_DISABLE_CPU_FEATURES", "OPENBLAS_CORETYPE")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, instruction-set flags) from /proc/cpuinfo; ("", {}) where there is none."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor(), frozenset(flags)


def kernel_fingerprint() -> dict:
    """What decides how this process's float kernels round: library versions, architecture, the instruction
    sets the CPU offers, the capability ATen runs with, and any variable that pins a library's dispatch."""
    import numpy
    import torch

    _, flags = _cpuinfo()
    return {
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": sorted(f for f in _KERNEL_FLAGS if f in flags),
        "pins": {name: os.environ[name] for name in _PINS if os.environ.get(name)},
    }


def describe() -> dict:
    """The machine in words a reader can compare with theirs: CPU, cores, OS, Python, and the kernel fingerprint."""
    model, _ = _cpuinfo()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        **kernel_fingerprint(),
    }


def one_line(machine: dict) -> str:
    """``describe()`` as one line for logs and pages."""
    pins = ", ".join(f"{k}={v}" for k, v in machine.get("pins", {}).items())
    return (f"{machine.get('cpu') or 'unknown CPU'}, {machine.get('cores')} cores, {machine['machine']}, "
            f"torch {machine['torch']} (CPU capability {machine['cpu_capability']}), numpy {machine['numpy']}"
            + (f", pinned: {pins}" if pins else ""))
