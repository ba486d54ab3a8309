"""glibc malloc settings for frame-rate work: keep big buffers in the heap instead of the kernel's.

Every frame allocates a few large blocks (a 6 MB RGB 1080p frame, the branch's activations).
With glibc's defaults a block that size is mmap'ed and unmapped again, or the heap top is
trimmed back to the kernel, so the next frame page-faults all of it in again: on the 2-core
build machine, `cemd calibrate` on 2 minutes of 1080p spent 38–41 s of its 240 CPU-seconds in
the kernel. With blocks up to 32 MB served from the heap and the heap never trimmed below
1 GB of free space, the same run spent 4 s there and scored 33–35 frames/s instead of 27–29
(docs/BENCHMARKS.md, "Memory allocation"). The cost: memory freed between frames stays with the
process (its peak stays resident), which is what a long-running monitor wants anyway.

``tune_malloc()`` applies the settings to this process (``mallopt``) and, through the
environment, to every process it starts (capture, inference workers, calibration workers,
overlay display), which read ``MALLOC_*_`` at start. Settings already in the environment are
the user's and are left alone; so is any libc that is not glibc. ``CEMD_DEFAULT_MALLOC=1`` turns
the tuning off (benchmarks use it to measure the difference).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling for it on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1024 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_ENV = {"MALLOC_MMAP_THRESHOLD_": (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)}


def tune_malloc() -> dict[str, int]:
    """Apply the settings (see the module docstring); returns what this process now uses.

    Empty when the platform is not Linux/glibc, the user set their own ``MALLOC_*_`` values, or
    ``CEMD_DEFAULT_MALLOC`` is set.
    """
    if (not sys.platform.startswith("linux") or any(k in os.environ for k in _ENV)
            or os.environ.get("CEMD_DEFAULT_MALLOC", "") not in ("", "0")):
        return {}
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return {}
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied: dict[str, int] = {}
    for key, (param, value) in _ENV.items():
        if mallopt(param, value) == 1:
            os.environ[key] = str(value)  # children: glibc reads it before any allocation
            applied[key] = value
    return applied
