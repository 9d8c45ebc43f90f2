"""An interactive WebSocket client, for trying meshgate from a terminal.

Usage:
    python examples/wsclient.py ws://127.0.0.1:6790/

Every message the server sends is printed on its own line; a binary message
is printed as base64 after the marker `[binary]`. Every line you type is sent
as one text message (without its newline). Ctrl-D (end of input) or Ctrl-C
closes the connection and exits.

The client sends a WebSocket ping every 20 seconds, so the server's idle
`read_timeout` (60 s by default) does not close a connection that is only
listening. Only tornado is needed.
"""

import argparse
import asyncio
import base64
import sys
import threading

from tornado.httpclient import HTTPClientError
from tornado.websocket import websocket_connect

PING_INTERVAL_S = 20


def read_stdin(loop, lines: asyncio.Queue) -> None:
    """Runs in a thread: hands each line of stdin to the event loop; None at end of input."""
    for line in sys.stdin:
        loop.call_soon_threadsafe(lines.put_nowait, line.rstrip("\r\n"))
    loop.call_soon_threadsafe(lines.put_nowait, None)


async def print_messages(conn) -> None:
    """Prints every message until the server closes the connection."""
    while True:
        message = await conn.read_message()
        if message is None:
            if conn.close_code is None:
                print("connection lost", file=sys.stderr)
            else:
                print(f"connection closed by the server: code {conn.close_code} {conn.close_reason or ''}",
                      file=sys.stderr)
            return
        if isinstance(message, bytes):
            print("[binary]", base64.b64encode(message).decode("ascii"), flush=True)
        else:
            print(message, flush=True)


async def send_lines(conn, lines: asyncio.Queue) -> None:
    """Sends each typed line as a text message until end of input."""
    while True:
        line = await lines.get()
        if line is None:
            return
        await conn.write_message(line)


async def main(url: str) -> None:
    conn = await websocket_connect(url, ping_interval=PING_INTERVAL_S)
    print(f"connected to {url}; type a line to send it, Ctrl-D to quit", file=sys.stderr)
    lines = asyncio.Queue()
    # A daemon thread, so that an unfinished read of stdin never delays the exit.
    threading.Thread(target=read_stdin, args=(asyncio.get_running_loop(), lines), daemon=True).start()
    receiving = asyncio.ensure_future(print_messages(conn))
    sending = asyncio.ensure_future(send_lines(conn, lines))
    try:
        # Stop as soon as either side is done: the server closed, or the input ended.
        await asyncio.wait([receiving, sending], return_when=asyncio.FIRST_COMPLETED)
    finally:
        receiving.cancel()
        sending.cancel()
        conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Interactive WebSocket client.")
    parser.add_argument("url", help="for example ws://127.0.0.1:6790/")
    args = parser.parse_args()
    try:
        asyncio.run(main(args.url))
    except KeyboardInterrupt:
        pass
    except (OSError, HTTPClientError) as exc:
        sys.exit(f"wsclient: cannot connect to {args.url}: {exc}")
