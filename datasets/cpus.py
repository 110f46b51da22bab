"""How many CPUs this process may use: its affinity mask (a SLURM task's allocation, ``taskset``, a container's
cpuset), not the machine's count, which ``os.cpu_count()`` gives and which overstates it on a shared node."""
from __future__ import annotations

import os


def usable_cpus() -> int:
    """The number of CPUs this process may run on (at least 1)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity call on this platform (macOS)
        return os.cpu_count() or 1
