"""What a benchmark ran on: platform, CPU model, cores, load, library versions, date.

Every bench result carries this record so that numbers from different machines (or from one shared,
busy machine) are never compared blindly. The load average is part of it: on a shared host a load above
the core count means other processes competed for the CPU while the bench ran.
"""

from __future__ import annotations

import os
import platform
import time


def cpu_model() -> str:
    """The ``model name`` line of /proc/cpuinfo, else `platform.processor()`."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def cpu_pressure() -> float | None:
    """Share of the last 10 s (in %) in which some runnable task waited for a CPU (Linux PSI), else None."""
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline().split()
    except OSError:
        return None
    return float(dict(kv.split("=") for kv in some[1:])["avg10"])


def contention() -> dict[str, object]:
    """Load average and CPU pressure now: how much other work competed for the CPU around a measurement."""
    return {"load_average": load_average(), "cpu_pressure_some_avg10": cpu_pressure()}


def _version(module: str) -> str | None:
    """``module.__version__``, or None where it is not installed (a GPU machine may lack Ray)."""
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def describe() -> dict[str, object]:
    """Machine and software record for a bench result (imports torch, numpy, pyarrow and, if present, ray)."""
    import numpy as np
    import pyarrow as pa
    import torch

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_average(),
        "cpu_pressure_at_start": cpu_pressure(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": _version("ray"),
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
    }
