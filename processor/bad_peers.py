"""Peer addresses whose links keep being closed for what they send, and so are refused a while.

Closing a link for its bad messages bounds what one link costs, not what a peer costs: a peer
that reconnects at once and sends garbage again made about 5,000 links a second beside
bench/run_hostile.py's good link, and accepting them, reading their frames and closing them
kept the event loop 95 % busy (py-spy, bench/RESULTS.md 2026-12-07 seventh session). So each
listener counts, per peer address, the links it closed for the peer's messages (a bad-message
rate, a framing error, another dialect); an address with `bad_links_per_address_max` of those
within `bad_links_window_seconds` has its new links refused until the oldest of them leaves
the window. Links it already holds are left alone: a network whose one link misbehaves keeps
its others. With worker processes each counts the links it closed itself (the kernel spreads a
peer's links over them), so a peer is refused by each after that process's count.

The card details page (processor/api/reveal.py) counts its refused looks per client the same
way: below the server and the HTTP side, which both use it and must not import each other.
"""

from __future__ import annotations

from collections import deque


class BadPeers:
    __slots__ = ("_addresses_max", "_closes")

    def __init__(self, addresses_max: int) -> None:
        self._addresses_max = addresses_max
        # (listener, address) -> the times of its latest bad closes (at most the limit's worth)
        self._closes: dict[tuple[str, str], deque[float]] = {}

    def closed(self, address: tuple[str, str], now: float, limit: int) -> None:
        """A link from `address` was closed at `now` for what its peer sent."""
        if limit <= 0:
            return
        times = self._closes.get(address)
        if times is None:
            if len(self._closes) >= self._addresses_max:
                del self._closes[next(iter(self._closes))]  # the longest known
            times = self._closes[address] = deque(maxlen=limit)
        times.append(now)

    def refused(self, address: tuple[str, str], now: float, limit: int, window: float) -> bool:
        """Whether a new link from `address` is refused: `limit` bad closes within `window`."""
        if limit <= 0:
            return False
        times = self._closes.get(address)
        if times is None or len(times) < limit:
            return False
        if now - times[-limit] < window:
            return True
        if now - times[-1] >= window:
            del self._closes[address]  # all of them old: forget the address
        return False
