"""How large the next batch may be, and how long a queue would take to decide.

A batch's answers all leave when its commit does, so a request that arrives while a batch is
being decided waits for that batch and then for its own: a link sending 100 requests/s beside a
greedy one sees about two batch times of latency, whatever round-robin does inside a batch.
Bounding batches in *time* (not only in count) bounds that wait on any machine: the size
follows from what batches measure, the time per request to decide and apply (which grows with
the batch) and the time of the commit (mostly one fsync, whatever the batch holds). A larger
budget shares each fsync among more requests (throughput); a smaller one answers sooner
(latency, fairness between links). bench/RESULTS.md measures both. The daemon lifts the bound
while it protects no one (saturated, no light link about: Daemon._batch_size).
"""

from __future__ import annotations

from typing import Final

# Batches at least this large measure the time per request (a smaller one's time is mostly the
# fixed cost of its transaction, and would overstate it).
SAMPLE_BATCH_MIN: Final = 8
SMOOTHING: Final = 0.2  # weight of the newest batch in the moving averages


class Pacer:
    __slots__ = ("_apply_per_request", "_budget", "_commit", "_size_min", "size", "size_max")

    def __init__(self, size_max: int, budget_seconds: float, size_min: int) -> None:
        self.size_max = size_max  # the count limit (ledger.batch_size_max)
        self._size_min = min(size_min, size_max)
        self._budget = budget_seconds  # 0: batches bounded by count alone
        self._apply_per_request = 0.0  # seconds to decide and apply one request (average)
        self._commit = 0.0  # seconds a commit takes (average)
        self.size = size_max  # the most requests the next batch may take

    def measured(self, requests: int, apply_seconds: float, commit_seconds: float) -> None:
        """A batch of `requests` took `apply_seconds` to decide and apply, then its commit."""
        if not requests:
            return
        self._commit += SMOOTHING * (commit_seconds - self._commit)
        if requests >= SAMPLE_BATCH_MIN:
            per_request = apply_seconds / requests
            self._apply_per_request += SMOOTHING * (per_request - self._apply_per_request)
        if self._budget and self._apply_per_request > 0:
            self.size = self._fitting(self._budget)

    def _fitting(self, budget: float) -> int:
        # Deciding and applying get what the commit leaves of the budget, but never less
        # than the commit takes: on a slow disk (an fsync of 5-10 ms) batches then stay
        # large enough that at least half of their time is work, not a collapse to a few
        # requests per fsync.
        apply_budget = max(budget - self._commit, self._commit)
        fits = int(apply_budget / self._apply_per_request)
        return max(self._size_min, min(self.size_max, fits))

    def size_within(self, seconds: float) -> int:
        """The most requests a batch may take to last about `seconds` (if less than the
        budget; never more than `size`)."""
        if not self._budget or self._apply_per_request <= 0 or seconds >= self._budget:
            return self.size
        return min(self.size, self._fitting(seconds))

    def queue_seconds(self, queued: int) -> float:
        """How long `queued` requests would take to decide and commit, batches as now."""
        if queued <= 0:
            return 0.0
        batches = -(-queued // self.size)
        return queued * self._apply_per_request + batches * self._commit
