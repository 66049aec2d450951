"""Structured logs (processor/logs.py): one JSON object a line on stderr, PANs never in clear."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from processor.logs import StderrHandler, mask_digits, setup_logging

PAN = "4761739001010010"
MASKED = "476173******0010"
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if isinstance(handler, StderrHandler):
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    err = capsys.readouterr().err
    assert err.endswith("\n") or err == ""
    records = [json.loads(line) for line in err.splitlines()]
    assert all(isinstance(record, dict) for record in records)
    return records


def only(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    records = lines(capsys)
    assert len(records) == 1, records
    return records[0]


def test_a_record_is_one_json_line_with_the_core_keys(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info")
    logging.getLogger("processor.test").info("hello %s\nsecond line", "world")
    record = only(capsys)
    assert set(record) == {"ts", "level", "logger", "message", "process", "pid"}
    assert (record["process"], record["pid"]) == ("processor", os.getpid())
    assert TS.match(record["ts"]), record["ts"]
    assert record["level"] == "info"
    assert record["logger"] == "processor.test"
    assert record["message"] == "hello world\nsecond line"


def test_a_line_names_the_process_that_wrote_it(capsys: pytest.CaptureFixture[str]) -> None:
    """A daemon's processes share one stderr: its workers' and delivery's lines could not be
    told from the primary's."""
    setup_logging("info", "worker-2")
    logging.getLogger("processor.test").warning("a worker's line")
    record = only(capsys)
    assert (record["process"], record["pid"]) == ("worker-2", os.getpid())


def test_extra_fields_are_carried_and_unencodable_ones_left_out(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("info")
    logging.getLogger("processor.test").warning(
        "link closed",
        extra={
            "peer": "127.0.0.1:5000",
            "bad_messages": 3,
            "ratio": 0.5,
            "flags": ["a", "b"],
            "detail": {"mti": "0100", "stan": "000123"},
            "opaque": object(),
        },
    )
    record = only(capsys)
    assert record["level"] == "warning"
    assert record["peer"] == "127.0.0.1:5000"
    assert record["bad_messages"] == 3
    assert record["ratio"] == 0.5
    assert record["flags"] == ["a", "b"]
    assert record["detail"] == {"mti": "0100", "stan": "000123"}
    assert "opaque" not in record


def test_an_extra_named_like_a_core_key_does_not_replace_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("info")
    logging.getLogger("processor.test").info("m", extra={"level": "fake", "ts": "fake"})
    record = only(capsys)
    assert record["level"] == "info"
    assert TS.match(record["ts"])


def test_level_filtering(capsys: pytest.CaptureFixture[str]) -> None:
    log = logging.getLogger("processor.test")
    setup_logging("warning")
    log.debug("debug")
    log.info("info")
    log.warning("warning")
    log.error("error")
    assert [(r["level"], r["message"]) for r in lines(capsys)] == [
        ("warning", "warning"),
        ("error", "error"),
    ]
    setup_logging("debug")
    log.debug("debug")
    assert only(capsys)["level"] == "debug"
    setup_logging("ERROR")
    log.warning("warning")
    log.error("error")
    assert only(capsys)["message"] == "error"


def test_setting_up_again_replaces_the_handler(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info")
    setup_logging("info")
    logging.getLogger("processor.test").info("once")
    assert len(lines(capsys)) == 1
    assert sum(isinstance(h, StderrHandler) for h in logging.getLogger().handlers) == 1


def test_an_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="verbose"):
        setup_logging("verbose")


def test_a_pan_in_the_message_is_masked(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info")
    logging.getLogger("processor.test").info("card %s, also inline 5555555555554444", PAN)
    raw = capsys.readouterr().err
    assert PAN not in raw and "5555555555554444" not in raw
    assert json.loads(raw)["message"] == f"card {MASKED}, also inline 555555******4444"


def test_a_pan_in_an_exception_is_masked(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info")
    try:
        raise ValueError(f"no card {PAN}")
    except ValueError:
        logging.getLogger("processor.test").exception("lookup failed")
    raw = capsys.readouterr().err
    assert PAN not in raw
    record = json.loads(raw)
    assert record["message"] == "lookup failed"
    assert "Traceback (most recent call last)" in record["exc"]
    assert f"ValueError: no card {MASKED}" in record["exc"]


def test_a_pan_in_an_extra_value_is_masked(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info")
    logging.getLogger("processor.test").info(
        "request",
        extra={
            "pan": PAN,
            "as_number": int(PAN),
            "nested": {"cards": [PAN], PAN: "key"},
            "track2": f"{PAN}=25121010000000000000",
        },
    )
    raw = capsys.readouterr().err
    assert PAN not in raw
    record = json.loads(raw)
    assert record["pan"] == MASKED
    assert record["as_number"] == MASKED
    assert record["nested"] == {"cards": [MASKED], MASKED: "key"}
    assert record["track2"].startswith(f"{MASKED}=")


def test_shorter_digit_runs_are_left_alone() -> None:
    # STAN, amount, RRN, terminal: none of them PAN-shaped.
    assert mask_digits("stan 000123 amount 000000001000 rrn 000000000001") == (
        "stan 000123 amount 000000001000 rrn 000000000001"
    )
    assert mask_digits(f"x{PAN}y") == f"x{MASKED}y"
    assert mask_digits("4761739001010") == "476173***1010"  # 13 digits
    assert mask_digits("4761739001010010123") == "476173*********0123"  # 19 digits


def test_card_numbers_grouped_or_inside_longer_runs_are_masked() -> None:
    """Only lone runs of 13-19 digits were masked: "4111 1111 1111 1111", a dashed PAN or
    one followed by its expiry went to the log in clear."""
    assert mask_digits(f"dropped: {PAN[:4]} {PAN[4:8]} {PAN[8:12]} {PAN[12:]}") == (
        f"dropped: {PAN[:4]} {PAN[4:6]}** **** {PAN[12:]}"
    )
    assert mask_digits(f"{PAN[:4]}-{PAN[4:8]}-{PAN[8:12]}-{PAN[12:]}") == (
        f"{PAN[:4]}-{PAN[4:6]}**-****-{PAN[12:]}"
    )
    assert mask_digits(f"{PAN}2512") == f"{PAN[:6]}{'*' * 10}2512"
    assert PAN[6:12] not in mask_digits("9" * 30 + PAN + "9" * 30)


@pytest.mark.e2e
def test_the_daemon_writes_only_json_lines_to_stderr(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROCESSOR_PAN_KEY"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    stderr_path = tmp_path / "stderr.log"
    command = [sys.executable, "-m", "processor.cli", "serve", "--ledger", str(tmp_path / "l")]
    command += ["--port", "0", "--http-port", "0", "--demo"]
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=tmp_path
        )
    try:
        assert process.stdout is not None
        stdout: list[str] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, f"daemon exited during start-up:\n{stderr_path.read_text()}"
            stdout.append(line)
            if line.strip() == "processor: ready":
                break
        else:
            pytest.fail("daemon did not become ready in time")
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=15)
        stdout.append(out)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    # The signal handlers come before anything is bound: even an immediate SIGTERM is the
    # orderly stop. stdout keeps its plain "processor: ..." lines: harnesses parse them.
    assert process.returncode == 0
    assert all(line.startswith("processor: ") for line in "".join(stdout).splitlines())
    text = stderr_path.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert records, "expected at least the insecure-key warning"
    for record in records:
        assert {"ts", "level", "logger", "message"} <= set(record), record
        assert TS.match(record["ts"])
    insecure = [r for r in records if "INSECURE" in r["message"]]
    # The development keys: PAN hashing, the demo BIN's card verification, personal data,
    # the PAN vault.
    assert len(insecure) == 4, records
    said = " | ".join(record["message"] for record in insecure)
    for what in (
        "PROCESSOR_PAN_KEY",
        "card verification key for BIN 476173",
        "PROCESSOR_DATA_KEY",
        "PROCESSOR_PAN_VAULT_KEY",
    ):
        assert what in said, what
    assert {record["level"] for record in insecure} == {"warning"}
