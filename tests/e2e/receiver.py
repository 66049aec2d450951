"""A webhook receiver for tests: a real HTTP server on 127.0.0.1 that records what it gets."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    """`fail_first` requests are answered 500; `delay_seconds` is slept before each answer."""

    def __init__(
        self,
        fail_first: int = 0,
        delay_seconds: float = 0.0,
        status: int = 204,
        slow_first: int | None = None,
    ):
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        self.delay_seconds = delay_seconds
        self.status = status
        self.calls = 0
        self.slow_first = slow_first  # only the first N requests are delayed (None: all)
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver._lock:
                    receiver.calls += 1
                    failing = receiver.calls <= receiver.fail_first
                    slow = receiver.slow_first is None or receiver.calls <= receiver.slow_first
                if receiver.delay_seconds and slow:
                    time.sleep(receiver.delay_seconds)
                    if receiver.slow_first is not None:
                        return  # the client gave up waiting: answer nothing, record nothing
                if failing:
                    self.send_response(500)
                else:
                    with receiver._lock:
                        receiver.received.append(
                            ({k.lower(): v for k, v in self.headers.items()}, body)
                        )
                    self.send_response(receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(body) for _, body in self.received]

    def wait_for(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.received) >= count:
                break
            time.sleep(0.05)
        return self.events()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
