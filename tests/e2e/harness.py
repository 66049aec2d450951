"""Helpers for end-to-end tests: the real daemon as a subprocess, blocking test links."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import iso8583

from processor.wire.codec import Codec
from processor.wire.framing import Framer
from processor.wire.spec import load_spec

PAN_KEY = "e2e-test-pan-key-of-at-least-32-bytes"
STARTUP_SECONDS = 20.0


class RunningDaemon:
    def __init__(
        self,
        ledger: Path,
        config: Path | None = None,
        env: dict[str, str] | None = None,
        *,
        demo: bool = True,
        open_files_limit: int | None = None,
    ):
        self.ledger = ledger
        # RLIMIT_NOFILE of the daemon, soft and hard (it raises its soft limit to the hard one).
        self.open_files_limit = open_files_limit
        self.config = config
        self.demo = demo  # --demo: demo cards; what is unset is filled in (tests mostly set it)
        self.env = dict(os.environ, PROCESSOR_PAN_KEY=PAN_KEY) if env is None else env
        self.process: subprocess.Popen[str] | None = None
        self.port = 0  # the first listener's
        self.ports: dict[str, int] = {}  # by listener name
        self.http_port = 0
        self.stdout: list[str] = []

    def command(self) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "processor.cli",
            "serve",
            "--ledger",
            str(self.ledger),
            "--port",
            "0",
            "--http-port",
            "0",
        ]
        if self.config is not None:
            command += ["--config", str(self.config)]
        if self.demo:
            command.append("--demo")
        return command

    def start(self) -> RunningDaemon:
        self.stdout = []
        self.stderr_path = self.ledger.parent / f"{self.ledger.name}-stderr.log"
        with self.stderr_path.open("a") as stderr:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                self.command(),
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=self.env,
                preexec_fn=self._limit_open_files if self.open_files_limit else None,
            )
        deadline = time.monotonic() + STARTUP_SECONDS
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"daemon exited during start-up:\n{self.stderr()}")
            self.stdout.append(line)
            if match := re.search(r"ISO 8583 listening on [\d.]+:(\d+) \(listener ([\w-]+)", line):
                self.ports[match.group(2)] = int(match.group(1))
                self.port = self.port or int(match.group(1))
            if match := re.search(r"HTTP listening on [\d.]+:(\d+)", line):
                self.http_port = int(match.group(1))
            if line.strip() == "processor: ready":
                return self
        raise RuntimeError("daemon did not become ready in time")

    def _limit_open_files(self) -> None:  # in the child, before exec
        limit = self.open_files_limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def terminate(self, timeout: float = 15.0, signum: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        out, _ = self.process.communicate(timeout=timeout)
        self.stdout.append(out)
        return self.process.returncode

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.kill9()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()

    def connect(self) -> Link:
        return Link(self.port)

    def settle(self) -> None:
        """Once this returns, everything the daemon answered is in LMDB, for a test reading
        the ledger itself: its /readyz reads the ledger, and a read in the daemon checkpoints
        the write-ahead log first (other processes see a batch at the checkpoint)."""
        if self.process is None or self.process.poll() is not None:
            return  # not running: nothing pending in it (a read-write open replays a crash's)
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        try:
            urllib.request.urlopen(url, timeout=10).read()
        except urllib.error.HTTPError as error:
            error.read()  # 503 (full, degraded): the ledger was read all the same


class Link:
    """A blocking test link: len2 framing, ASCII spec; matches nothing, returns frames in order."""

    def __init__(self, port: int, prefix: str = "len2", bitmap: str = "ascii", header: bytes = b""):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.framer = Framer(prefix, header_bytes=len(header), max_frame_bytes=8192)  # type: ignore[arg-type]
        self.header = header  # sent before each message's MTI
        self.last_header = b""  # the header of the latest frame received
        self.spec = load_spec(bitmap)  # type: ignore[arg-type]
        self.codec = Codec(self.spec)
        self._frames: list[tuple[bytes, bytes]] = []

    def send_fields(self, fields: dict[str, str]) -> bytes:
        message = self.codec.encode(fields)
        self.send_message(message)
        return message

    def send_message(self, message: bytes) -> None:
        self.sock.sendall(self.framer.frame(self.header, message))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> bytes:
        while not self._frames:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("link closed by the processor")
            self._frames.extend(self.framer.feed(data))
        self.last_header, message = self._frames.pop(0)
        return message

    def receive_fields(self) -> dict[str, str]:
        return decode(self.receive(), self.spec.name.endswith("binary-bitmap"))

    def exchange(self, fields: dict[str, str]) -> dict[str, str]:
        self.send_fields(fields)
        return self.receive_fields()

    def is_closed_by_peer(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def decode(message: bytes, binary: bool = False) -> dict[str, str]:
    fields, _ = iso8583.decode(message, load_spec("binary" if binary else "ascii").iso)
    return fields


_stan = [100000]


def next_stan() -> str:
    _stan[0] += 1
    return f"{_stan[0] % 1_000_000:06d}"


def authorization(
    pan: str = "4761739001010010", amount: int = 1000, **overrides: str
) -> dict[str, str]:
    fields = {
        "t": "0100",
        "2": pan,
        "3": "000000",
        "4": f"{amount:012d}",
        "7": "1124101010",
        "11": next_stan(),
        "18": "5411",
        "22": "051",
        "32": "123456",
        "37": "000000000001",
        "41": "TERM0001",
        "42": "MERCHANT0000001",
        "49": "978",
    }
    fields.update(overrides)
    return fields


def echo_test() -> dict[str, str]:
    return {"t": "0800", "7": "1124101010", "11": next_stan(), "70": "301"}


def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processor.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
        env=dict(os.environ, PROCESSOR_PAN_KEY=PAN_KEY) if env is None else env,
    )


def run_serve(
    ledger: Path, *flags: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`processor serve` on `ledger` and free ports, for a start expected to fail (it would
    run until stopped otherwise); later flags win, so `--port N` picks a port."""
    return run_cli(
        "serve", "--ledger", str(ledger), "--port", "0", "--http-port", "0", *flags, env=env
    )


def scrape(daemon: RunningDaemon) -> str:
    """The daemon's /metrics text."""
    url = f"http://127.0.0.1:{daemon.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def sample(text: str, series: str, default: float | None = None) -> float:
    """The value of one series (`name{labels}`, as exposed) in a /metrics text."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    if default is not None:
        return default
    raise AssertionError(f"metric {series} not exposed")
