"""How the train loader reads its beton: the order rule and the memory checks at start-up.

FFCV reads a beton in one of two ways (``data.os_cache``):

* ``true``: memory-mapped through the OS page cache, shared by every process of the node. Fast
  when the beton fits in RAM; when it does not, pages are evicted and re-read from disk every
  epoch, in 4 KB pieces, at random places.
* ``false``: each process reads whole beton pages (2-8 MiB) into its own memory and drops them
  after their last sample. In ``random`` order nearly every page is needed until the epoch's end,
  so each process holds the whole beton; in ``quasi_random`` order samples come from a window of
  ``2 x batch_size`` pages at a time, so a process holds that window, whatever the beton's size.

Hence ``data.order: auto`` (the default) = ``random`` with ``os_cache``, ``quasi_random`` without.
The rule depends on the config alone (not on the machine), so a requeued job on another node
draws the same order and resumes exactly. ``bench/loader_scale.py`` measures both.
"""
from __future__ import annotations

from pathlib import Path

# the page cache should hold the beton with room to spare for the processes themselves
PAGE_CACHE_SHARE = 0.5


def loader_order(order: str, os_cache: bool) -> str:
    """The train loader's order for config values ``data.order`` and ``data.os_cache``."""
    if order != "auto":
        return order
    return "random" if os_cache else "quasi_random"


def node_memory_bytes() -> int:
    """This node's RAM, or the memory limit of this process's cgroup (a SLURM job's ``--mem``) if lower;
    the page cache is charged to that limit too."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":  # cgroup v2
                candidate = Path("/sys/fs/cgroup", path.lstrip("/"), "memory.max")
            elif "memory" in controllers.split(","):  # cgroup v1
                candidate = Path("/sys/fs/cgroup/memory", path.lstrip("/"), "memory.limit_in_bytes")
            else:
                continue
            try:
                text = candidate.read_text().strip()
            except OSError:
                continue
            if text.isdigit():
                limits.append(int(text))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else 0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # pragma: no cover


def access_warnings(beton: Path, order: str, os_cache: bool, memory_bytes: int, local_ranks: int = 1) -> list[str]:
    """One line per problem of reading ``beton`` this way on a node with ``memory_bytes`` of memory and
    ``local_ranks`` training processes (empty when it is fine or the memory is unknown)."""
    if memory_bytes <= 0:
        return []
    size = beton.stat().st_size
    budget = PAGE_CACHE_SHARE * memory_bytes
    order = loader_order(order, os_cache)
    if os_cache and size > budget:
        return [f"data.os_cache: {beton.name} is {_size(size)}, more than half of this node's memory "
                f"({_size(memory_bytes)}): the page cache cannot keep it and every epoch reads it from disk again in "
                f"small random pieces; set data.os_cache=false (data.order=auto then reads it quasi_random, holding "
                f"2 x data.batch_size beton pages per process)"]
    if not os_cache and order == "random" and size * local_ranks > budget:
        return [f"data.order: random with data.os_cache=false makes each of the {local_ranks} process(es) on this node "
                f"hold nearly all of {beton.name} ({_size(size)}) in its own memory; use data.order=auto "
                f"(quasi_random)"]
    return []
