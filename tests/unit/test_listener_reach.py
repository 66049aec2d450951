"""Which listeners overlap on one port (processor.app.reach_of), with real sockets bound the
way the daemon binds them (SO_REUSEPORT, as with workers, so that both binds succeed)."""

from __future__ import annotations

import socket

import pytest

from processor.app import reach_of
from processor.server.daemon import StartupError, listen


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.mark.parametrize(
    ("first", "second", "overlap"),
    [
        ("127.0.0.1", "localhost", True),
        ("", "0.0.0.0", True),  # "" takes both families
        ("", "127.0.0.1", True),
        ("0.0.0.0", "127.0.0.1", True),
        ("127.0.0.1", "127.0.0.2", False),
        ("0.0.0.0", "::1", False),  # one family each
        ("::", "127.0.0.1", False),  # "::" alone is IPv6 only
        ("127.0.0.1", "::1", False),
    ],
)
def test_listeners_overlap_only_where_one_takes_the_others_connections(
    first: str, second: str, overlap: bool
) -> None:
    port = free_port()
    try:
        sockets = [listen(host, port, shared=True) for host in (first, second)]
    except StartupError as error:  # a machine without IPv6
        pytest.skip(f"cannot bind {first!r} and {second!r}: {error}")
    try:
        one, other = (reach_of(sock) for sock in sockets)
        assert one.overlaps(other) == overlap
        assert other.overlaps(one) == overlap
    finally:
        for sock in sockets:
            sock.close()
