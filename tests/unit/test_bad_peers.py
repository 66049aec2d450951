"""BadPeers: an address with `limit` bad link closes within `window` is refused, then not."""

from __future__ import annotations

from processor.bad_peers import BadPeers

PEER = ("network", "192.0.2.7")


def test_an_address_is_refused_at_the_limit_within_the_window_and_only_then() -> None:
    peers = BadPeers(addresses_max=16)
    for second in range(4):
        peers.closed(PEER, float(second), limit=5)
    assert not peers.refused(PEER, 4.0, limit=5, window=10.0)  # four closes: not yet
    peers.closed(PEER, 4.0, limit=5)
    assert peers.refused(PEER, 4.5, limit=5, window=10.0)
    assert not peers.refused(("network", "192.0.2.8"), 4.5, limit=5, window=10.0)
    assert not peers.refused(("other", "192.0.2.7"), 4.5, limit=5, window=10.0)  # per listener
    # The oldest close (at 0) leaves the window at 10: four within it again, accepted.
    assert peers.refused(PEER, 9.9, limit=5, window=10.0)
    assert not peers.refused(PEER, 10.0, limit=5, window=10.0)
    # One more close and it is five within the window again.
    peers.closed(PEER, 10.5, limit=5)
    assert peers.refused(PEER, 10.6, limit=5, window=10.0)


def test_a_limit_of_zero_refuses_nobody_and_remembers_nothing() -> None:
    peers = BadPeers(addresses_max=16)
    for second in range(100):
        peers.closed(PEER, float(second), limit=0)
    assert not peers.refused(PEER, 100.0, limit=0, window=10.0)
    assert peers._closes == {}


def test_addresses_are_forgotten_when_quiet_and_bounded_in_number() -> None:
    peers = BadPeers(addresses_max=3)
    peers.closed(PEER, 0.0, limit=1)
    assert peers.refused(PEER, 0.5, limit=1, window=1.0)
    assert not peers.refused(PEER, 2.0, limit=1, window=1.0)
    assert PEER not in peers._closes  # all its closes old: forgotten
    for host in range(10):
        peers.closed(("network", f"192.0.2.{host}"), 3.0, limit=1)
    assert len(peers._closes) == 3  # the longest known went first
    assert peers.refused(("network", "192.0.2.9"), 3.5, limit=1, window=1.0)
