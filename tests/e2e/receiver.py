"""A webhook receiver for tests: a real HTTP server on 127.0.0.1 that records what it gets."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple


class Attempt(NamedTuple):
    """One request as it arrived, whatever it was answered."""

    arrived: float  # time.monotonic() when its headers were read, before any answer
    method: str
    path: str
    headers: dict[str, str]
    status: int  # what it was answered (0: nothing, the client gave up first)


class Receiver:
    """`fail_first` requests are answered 500; `delay_seconds` is slept before each answer.

    `answers` (status, headers), when any are left, answer the next requests first, one each,
    in order; such requests are recorded in `attempts` only, never in `received`.
    """

    def __init__(
        self,
        fail_first: int = 0,
        delay_seconds: float = 0.0,
        status: int = 204,
        slow_first: int | None = None,
        answers: list[tuple[int, dict[str, str]]] | None = None,
    ):
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.attempts: list[Attempt] = []
        self.answers = list(answers or [])
        self.fail_first = fail_first
        self.delay_seconds = delay_seconds
        self.status = status
        self.calls = 0
        self.slow_first = slow_first  # only the first N requests are delayed (None: all)
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.answer("POST")

            def do_GET(self) -> None:  # only a followed redirect would ask for anything
                self.answer("GET")

            def answer(self, method: str) -> None:
                arrived = time.monotonic()
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver._lock:
                    receiver.calls += 1
                    scripted = receiver.answers.pop(0) if receiver.answers else None
                    failing = receiver.calls <= receiver.fail_first
                    slow = receiver.slow_first is None or receiver.calls <= receiver.slow_first
                if scripted is not None:
                    status, extra = scripted
                    self.record(Attempt(arrived, method, self.path, headers, status))
                    self.send_response(status)
                    for name, value in extra.items():
                        self.send_header(name, value)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                if receiver.delay_seconds and slow:
                    time.sleep(receiver.delay_seconds)
                    if receiver.slow_first is not None:
                        self.record(Attempt(arrived, method, self.path, headers, 0))
                        return  # the client gave up waiting: answer nothing, not received
                if failing:
                    self.record(Attempt(arrived, method, self.path, headers, 500))
                    self.send_response(500)
                else:
                    self.record(Attempt(arrived, method, self.path, headers, receiver.status))
                    with receiver._lock:
                        receiver.received.append((headers, body))
                    self.send_response(receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def record(self, attempt: Attempt) -> None:
                with receiver._lock:
                    receiver.attempts.append(attempt)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return self.url_for("/hook")

    def url_for(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

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

    def wait_for_attempts(self, count: int, timeout: float = 20.0) -> list[Attempt]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.attempts) >= count:
                break
            time.sleep(0.05)
        with self._lock:
            return list(self.attempts)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
