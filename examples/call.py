"""Sends one request to the backend WebSocket API and prints the reply.

Usage:
    python examples/call.py METHOD PARAMS [--api ws://127.0.0.1:6789/ws/v1] [--user NAME]

METHOD is one of queue.unpop, conn.call, mesh.send, mesh.publish; PARAMS is
the request's `p` as JSON. For example, to subscribe a client to a channel:

    python examples/call.py conn.call '{"c": "CLIENT_ID", "f": "subscribe", "a": ["news"]}'

The reply envelope is printed as JSON; the exit status is 1 when it carries
an error (`E` is set). With API users configured, `--user NAME` sends
credentials (password from MESHGATE_PASSWORD, or asked). Only tornado is needed.
"""

import argparse
import asyncio
import json
import sys

from tornado.httpclient import HTTPClientError

import api_connection


async def call(args, method: str, params) -> dict:
    conn = await api_connection.connect(args)
    try:
        await conn.write_message(json.dumps({"m": method, "p": params, "i": 1}))
        reply = await conn.read_message()
    finally:
        conn.close()
    if reply is None:
        raise OSError("the API connection was closed before the reply")
    return json.loads(reply)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Send one request to /ws/v1 and print the reply.")
    parser.add_argument("method", help="for example conn.call")
    parser.add_argument("params", help="the request's parameters as JSON")
    api_connection.add_options(parser)
    args = parser.parse_args()
    try:
        params = json.loads(args.params)
    except ValueError as exc:
        sys.exit(f"call: PARAMS is not valid JSON: {exc}")
    try:
        reply = asyncio.run(call(args, args.method, params))
    except (OSError, HTTPClientError) as exc:
        sys.exit(f"call: {args.api}: {exc}")
    print(json.dumps(reply, ensure_ascii=False))
    sys.exit(1 if reply.get("E") else 0)
