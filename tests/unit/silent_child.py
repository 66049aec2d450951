"""A child process that reports ready and then hangs (tests/unit/test_child_supervision.py):
run as `python -m tests.unit.silent_child CHANNEL_FD` by processor.channel.Child."""

import asyncio
import socket
import sys
import time

from processor.channel import Report, send_report


async def main() -> None:
    channel = socket.socket(fileno=int(sys.argv[1]))
    _, writer = await asyncio.open_unix_connection(sock=channel)
    await send_report(writer, Report("ready"))
    time.sleep(60)  # hung: its loop blocked, no report follows (SIGTERM ends it)


asyncio.run(main())
