"""Structured logs: one JSON object per line on stderr, PAN-shaped digit runs masked.

Each line carries `ts` (RFC 3339, UTC, milliseconds), `level`, `logger`, `message`, `process`
(which of the daemon's processes wrote it: `primary`, `worker-<n>`, `delivery`, or the command
that ran) and `pid`, since the processes of one daemon share one stderr; `exc`
(the formatted traceback) when the record has exception info, `stack` when it has stack info; and
every `extra=` field of the call whose value JSON can carry (others are left out).

The masking is a safety net, not the protection: code must not log PANs at all. Every string that
leaves (message, traceback, logger name, extra keys and values, numbers written out) has each run
of 13 digits or more, grouped by spaces or dashes (or as card numbers are, by `._:/`) or not, masked
(`processor.security.mask_card_numbers`: first six, stars, last four), so a PAN that slips into
a log call or an exception message still never reaches a log line.

The "processor: ..." lines on stdout (`processor.app.announce`) are not logs: people and
test harnesses read them, and they keep their plain form.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from processor.security import mask_card_numbers

LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# 13 digits in a row at least: as long as a PAN can be (ISO/IEC 7812).
_LONG_NUMBER = re.compile(r"\d{13}")

# The attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES: Final = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))
) | {"message", "asctime", "taskName"}

_CORE_KEYS: Final = frozenset(
    {"ts", "level", "logger", "message", "process", "pid", "exc", "stack"}
)

_encoder = msgspec.json.Encoder()


def mask_digits(text: str) -> str:
    """`text` with every run of 13 digits or more (or of digit groups split as
    mask_card_numbers reads them) masked: first six, stars, last four, whether it is a card
    number or not."""
    return mask_card_numbers(text, every_run=True)


def _scrub(value: Any) -> Any:
    """A JSON value (as msgspec decodes it) with its strings and long numbers masked."""
    if isinstance(value, str):
        return mask_digits(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        written = repr(value)
        # A number that reads as a PAN goes out as a masked string: JSON has no masked number.
        return mask_digits(written) if _LONG_NUMBER.search(written) else value
    if isinstance(value, list):
        return [_scrub(item) for item in value]
    if isinstance(value, dict):
        return {mask_digits(str(key)): _scrub(item) for key, item in value.items()}
    return mask_digits(str(value))  # not reached for decoded JSON; masked all the same


def _json_value(value: Any) -> tuple[bool, Any]:
    """(True, plain JSON value) if msgspec can encode `value`, else (False, None)."""
    try:
        return True, msgspec.json.decode(_encoder.encode(value))
    except (TypeError, ValueError, OverflowError, RecursionError, msgspec.MsgspecError):
        return False, None


def _timestamp(created: float) -> str:
    moment = datetime.fromtimestamp(created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (no newline at the end)."""

    def __init__(self, process: str = "processor") -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception as error:  # a bad format string must not cost the line
            message = f"{record.msg!s} (log arguments did not format: {error!r})"
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": mask_digits(record.name),
            "message": mask_digits(message),
            "process": self._process,
            "pid": record.process,
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = mask_digits(record.exc_text)
        if record.stack_info:
            entry["stack"] = mask_digits(self.formatStack(record.stack_info))
        for key, value in record.__dict__.items():
            if key in _RECORD_ATTRIBUTES or key.startswith("_"):
                continue
            name = mask_digits(key)
            if name in _CORE_KEYS:
                continue  # the record's own fields win over an extra of the same name
            encodable, plain = _json_value(value)
            if encodable:
                entry[name] = _scrub(plain)
        return _encoder.encode(entry).decode("utf-8")


class StderrHandler(logging.Handler):
    """Writes to whatever `sys.stderr` is at the time of each record (tests swap it)."""

    terminator = "\n"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            stream = sys.stderr
            stream.write(line + self.terminator)
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def setup_logging(level: str, process: str = "processor") -> None:
    """Send the root logger's records to stderr as JSON lines, at `level` and above, each
    naming `process` (the daemon's `primary`, `worker-<n>`, `delivery`; a command's name).

    `level` is one of "debug", "info", "warning", "error" (`log.level` in the config). Calling it
    again replaces the handler it installed before; handlers others installed are left alone.
    """
    try:
        threshold = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"log level {level!r}: expected one of {', '.join(LEVELS)}") from None
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, StderrHandler):
            root.removeHandler(handler)
            handler.close()
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter(process))
    root.addHandler(handler)
    root.setLevel(threshold)
