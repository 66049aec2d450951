"""Bounded logging of what peers cause: a peer must not be able to fill the log disk.

Each peer address may write a few lines of one kind (an undecodable message, a format error),
then at most one per interval, which says how many were left out since the last; the left-out
lines are counted in /metrics (`processor_log_lines_suppressed_total{kind}`). 10^6 bad frames
then write a handful of lines instead of a million, however often the peer reconnects (a budget
per link was reset by every new connection: 26,747 lines in 5 s from one reconnecting peer).
The daemon keeps one per peer address, one for refused links, and the HTTP port one for
malformed requests. Below the server and the HTTP side, which both use it
and must not import each other.
"""

from __future__ import annotations

from processor import limits


class LogBudget:
    __slots__ = ("_kinds",)

    def __init__(self) -> None:
        # kind -> [lines written in the first burst, suppressed since the last line, last time]
        self._kinds: dict[str, list[float]] = {}

    def would_allow(
        self, kind: str, now: float, burst: int = limits.log_lines_per_kind_burst
    ) -> bool:
        """Whether a line of `kind` would be written now (nothing is counted): for work done
        only to say something in that line."""
        state = self._kinds.get(kind)
        return (
            state is None
            or state[0] < burst
            or now - state[2] >= limits.log_suppressed_interval_seconds
        )

    def allow(
        self, kind: str, now: float, burst: int = limits.log_lines_per_kind_burst
    ) -> int | None:
        """None: leave this line out. Otherwise write it, noting the returned number of lines
        of this kind left out since the last one written. `burst`: lines written before the
        budget applies."""
        state = self._kinds.get(kind)
        if state is None:
            state = self._kinds[kind] = [0, 0, now]
        if state[0] < burst:
            state[0] += 1
            state[2] = now
            return 0
        if now - state[2] >= limits.log_suppressed_interval_seconds:
            suppressed = int(state[1])
            state[1] = 0
            state[2] = now
            return suppressed
        state[1] += 1
        return None
