"""How a bench server process runs: ready line on stdout, then serve until told to stop."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys


async def serve_until_stopped(ready_line: str) -> None:
    """Print `ready_line`, then wait for SIGTERM/SIGINT or the launcher's stdin pipe to close."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    stdin = sys.stdin.fileno()

    def on_stdin() -> None:
        if not os.read(stdin, 4096):
            stopping.set()

    if stat.S_ISFIFO(os.fstat(stdin).st_mode):
        # The launcher holds this pipe open; EOF means it is gone, whatever way it went.
        loop.add_reader(stdin, on_stdin)
    print(ready_line, flush=True)
    await stopping.wait()
