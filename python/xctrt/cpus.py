"""How many CPUs this process may use: the affinity mask where the OS has one (containers and `taskset`
often allow fewer than the machine has), else the machine's count."""
from __future__ import annotations

import os


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # macOS, Windows
        return os.cpu_count() or 1
