"""Peak resident memory of one benchmark row on a CPU, several rows in one process.

``getrusage``'s peak only grows, so the rows of a run after the first would inherit the first's peak. On Linux,
writing 5 to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM) to the current resident size;
freed heap is handed back first (glibc's malloc_trim) so one row's garbage does not count in the next.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak() -> bool:
    """Start a new peak at the current resident size; False where the OS offers no reset."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: freed heap may stay resident
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_mib() -> float:
    """Peak resident size since the last reset (VmHWM), else since the process started, in MiB."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
