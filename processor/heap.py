"""What the cyclic garbage collector may skip: everything a process built before serving.

A full (oldest-generation) collection walks every tracked object the process holds: the
imported modules' functions, classes and tables, the config, the catalog, the metrics. In the
daemon at saturation one took about 21 ms (30 in 300,000 requests: 0.63 s, a 21 ms stall of
the event loop each; bench/RESULTS.md, 2026-12-07 seventh session). None of those objects ever
becomes garbage, so each process freezes them (`gc.freeze`: moved to a generation the collector
never visits) once it is set up, just before it reports ready. Collections then walk only what
was made since: 0.8 ms each in the same run. Cycles made after that are still collected.
"""

from __future__ import annotations

import gc


def freeze_setup() -> None:
    """Exempt every object alive now from later collections (call once, set up, not serving)."""
    gc.collect()  # what set-up left as garbage goes now, not frozen for good
    gc.freeze()
