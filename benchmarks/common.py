"""What every benchmark script shares: its four common flags, its clock, its statistic, its memory unit, its report.

    parser = common.parser(__file__, __doc__, quick="tiny model, 3 repeats")  # --quick --json --threads --device
    parser.add_argument(...)  # the script's own flags
    args = common.parse(parser, argv, quick={"preset": "tiny", "repeats": 3})
    seconds = common.time_calls(fn, repeats=args.repeats, warmup=args.warmup, timer=common.Timer(args.device))
    row = {**common.timing("encoder", seconds), "peak_memory_mib": common.peak_memory_mib(args.device)}
    common.report(args, rows, model="vit-b")  # prints nothing; writes {"meta": ..., "rows": rows} to --json

- ``--quick`` swaps in the script's small defaults (a tiny model, few repeats: what the tests run); flags given
  on the command line still win over them.
- ``--json PATH`` writes ``{"meta": {...}, "rows": [...]}``: meta says what ran where (machine, versions,
  command, threads, device, date, plus the script's own settings), rows are the measurements, one dict each.
- ``--threads N`` sets torch's CPU thread count (default: torch's own, or the script's stated default).
- ``--device`` is where the work runs: cuda when available, else cpu. Scripts whose work is CPU work (data
  loading, one attention layer's CPU kernels, parameter counting) take ``cpu`` only and say so.
- Timings: CUDA events around each call on a GPU, ``time.perf_counter`` around it on a CPU, after warm-up
  calls; reported as the median and the 90th percentile in milliseconds, keys ``NAME_median_ms`` and
  ``NAME_p90_ms``.
- Memory in MiB (2**20 bytes), keys ``*_mib``: the CUDA allocator's peak on a GPU; on a CPU the process's peak
  resident size since the last ``reset_peak_memory`` (Linux resets the kernel's high-water mark, below).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
VERSIONED = ("torch", "transformers", "peft", "accelerate", "samtune")


# ---------------------------------------------------------------------------------------------------------------
# flags


def parser(
    script: str, description: str | None, quick: str, cpu_only: str | None = None, threads: int | None = None
) -> argparse.ArgumentParser:
    """An ArgumentParser for the script at path ``script`` with the four common flags. ``quick`` says what --quick
    runs; ``cpu_only``, when given, says why the script's work runs on the CPU (then --device takes cpu alone);
    ``threads`` is the script's own default thread count (None: torch's)."""
    result = argparse.ArgumentParser(
        prog=f"python benchmarks/{Path(script).name}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    common = result.add_argument_group("common to every benchmark (benchmarks/common.py)")
    common.add_argument("--quick", action="store_true", help=f"small and fast: {quick} (what the tests run)")
    common.add_argument("--json", type=Path, metavar="PATH", help='write {"meta": {...}, "rows": [...]} here')
    thread_default = f"{threads}" if threads else "torch's default"
    common.add_argument("--threads", type=int, default=threads, metavar="N", help=f"CPU threads ({thread_default})")
    if cpu_only:
        common.add_argument("--device", default="cpu", choices=["cpu"], help=f"cpu only: {cpu_only}")
    else:
        common.add_argument(
            "--device", default=default_device(), help="cuda, cuda:N or cpu (default: cuda when available, else cpu)"
        )
    return result


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, quick: dict | None = None):
    """Parse ``argv`` (default: the command line); with --quick, ``quick`` replaces the defaults (flags given still
    win). Applies --threads, turns --device into a ``torch.device`` (an error when CUDA is asked for and absent),
    and keeps the argv in ``args.argv`` for the report's meta."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.quick and quick:  # argparse leaves attributes already on the namespace to the flags given
        args = parser.parse_args(argv, namespace=argparse.Namespace(**quick))
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads takes a positive count")
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (torch {torch.__version__})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: the benchmarks measure cpu or cuda")
    args.device, args.argv, args.prog = device, argv, parser.prog
    return args


# ---------------------------------------------------------------------------------------------------------------
# time


class Timer:
    """Seconds one call takes: CUDA events around it on a GPU (waiting for the end event), a monotonic clock on a
    CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def time_calls(fn: Callable[[], object], repeats: int, warmup: int, timer: Timer) -> list[float]:
    """Seconds of each of ``repeats`` timed calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    if timer.cuda:
        torch.cuda.synchronize()
    return [timer(fn) for _ in range(repeats)]


def timing(name: str, seconds: Sequence[float]) -> dict[str, float]:
    """``{NAME_median_ms, NAME_p90_ms}`` (``{median_ms, p90_ms}`` for an empty name) of timed calls given in
    seconds; p90 by linear interpolation between the calls."""
    if not len(seconds):
        raise ValueError(f"{name or 'timing'}: no timed calls")
    ms = np.asarray(seconds, dtype=float) * 1000
    prefix = f"{name}_" if name else ""
    return {f"{prefix}median_ms": float(np.median(ms)), f"{prefix}p90_ms": float(np.percentile(ms, 90))}


# ---------------------------------------------------------------------------------------------------------------
# memory

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak: the CUDA allocator's, or on a CPU the process's resident high-water mark (VmHWM).

    ``getrusage``'s peak only grows, so rows after the first would inherit the first's. On Linux, writing 5 to
    /proc/self/clear_refs resets VmHWM to the current resident size; freed heap is handed back first (glibc's
    malloc_trim) so one row's garbage does not count in the next. False where the OS offers no reset."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: freed heap may stay resident
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_memory_mib(device: torch.device) -> float:
    """Peak since the last reset, in MiB: CUDA allocator peak, or the process's peak resident size (VmHWM; where
    there is none, getrusage's peak since the process started)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def memory_kind(device: torch.device) -> str:
    """What ``peak_memory_mib`` measures on ``device``."""
    if torch.device(device).type == "cuda":
        return "cuda allocator peak"
    return "process peak resident size since the row began"


# ---------------------------------------------------------------------------------------------------------------
# report


def describe(device: torch.device) -> str:
    """The device in words, for printed headers: the GPU's name, or the CPU with its thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # e.g. samtune on PYTHONPATH, not installed
        module = sys.modules.get(package)
        return getattr(module, "__version__", None)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(HERE), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine() -> dict:
    """The CPU (model, cores, usable cores), the OS, and the GPU when there is one."""
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "gpu": None,
        "gpu_memory_mib": None,
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=properties.name, gpu_memory_mib=properties.total_memory / 2**20)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def meta(args: argparse.Namespace, **extra) -> dict:
    """What ran, where and when: the report's ``meta``. ``extra`` holds the script's own settings."""
    return {
        "benchmark": Path(args.prog).stem,
        "command": [*args.prog.split(), *args.argv],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": {"python": platform.python_version(), **{name: _version(name) for name in VERSIONED}},
        "git": _git_commit(),
        "device": str(args.device),
        "device_name": describe(args.device),
        "threads": torch.get_num_threads(),
        "quick": bool(args.quick),
        "timing": "median and p90 in ms over timed calls after warm-up; CUDA events on a GPU, perf_counter on a CPU",
        "memory_unit": "MiB",
        **extra,
    }


def report(args: argparse.Namespace, rows: list[dict], **extra) -> dict:
    """``{"meta": meta(args, **extra), "rows": rows}``, written to ``args.json`` when given."""
    result = {"meta": meta(args, **extra), "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result
