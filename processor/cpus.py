"""Which CPUs the daemon's processes run on (`server.cpus`, `webhooks.delivery_cpus`).

On a machine whose cores are shared by the authorisation loop and webhook delivery, each can
be given cores of its own: the kernel then never runs a delivery burst on the core an
authorisation is waiting for (issue 13). bench/RESULTS.md (2026-12-07) found no gain on a
2-core machine, where the second core then carries delivery and everything else: it is for
machines with a core to spare. Empty: the process runs wherever the kernel puts it, as it
inherited. `server.cpus` holds for the daemon's worker processes too (they inherit it).
"""

from __future__ import annotations

import os
from collections.abc import Collection


def unavailable_cpus(setting: str, cpus: Collection[int]) -> str | None:
    """What is wrong with `setting` (a config key naming CPUs), or None.

    Tried rather than compared with this process's mask, which a parent may have narrowed:
    what counts is what the kernel (and the cgroup's cpuset) lets a process of ours run on.
    The mask is put back as it was.
    """
    if not cpus:
        return None
    wanted = set(cpus)
    current = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, wanted)
        granted = os.sched_getaffinity(0)
    except (OSError, ValueError, OverflowError):
        granted = set()
    finally:
        os.sched_setaffinity(0, current)
    missing = sorted(wanted - granted)
    if not missing:
        return None
    return (
        f"{setting}: CPU {', '.join(map(str, missing))} is not one this machine (or its "
        "cpuset) lets the daemon run on"
    )


def pin(cpus: Collection[int]) -> None:
    """Run this process (and what it starts later) on `cpus`; nothing when empty. Called
    before the process starts any thread: the mask is set for the calling thread, which
    threads started later inherit."""
    if cpus:
        os.sched_setaffinity(0, set(cpus))
