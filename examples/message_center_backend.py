"""The backend of conf/entries/message_center.py: checks login tokens and sets the user id.

Usage: .venv/bin/python examples/message_center_backend.py [--api ws://127.0.0.1:6789/ws/v1] [--user NAME]

It consumes the topic `auth` over /ws/v1 (`queue.pop`). Each event carries a
token and the client's id; a token of the form `token-<uid>` (a stand-in for a
real session lookup) logs the client in as <uid>: the backend answers with
`conn.call set_context_value ["uid", <uid>]`, which wakes the entry waiting in
`wait_context_value`. Any other token is ignored (the entry answers
"Auth failed" after its timeout). Then send to a user with
`/v1/mesh/publish {"c": "user:<uid>", "d": ...}`. With API users configured,
`--user NAME` sends credentials (password from MESHGATE_PASSWORD, or asked).
Needs only tornado.
"""

import argparse
import asyncio
import json
import re
import sys

import api_connection

TOKEN = re.compile(r"token-([A-Za-z0-9_-]{1,64})\Z")


def uid_for(token: str):
    """Stand-in for a real session store: `token-alice` belongs to user `alice`."""
    match = TOKEN.match(token)
    return match.group(1) if match else None


async def serve(args) -> None:
    api_url = args.api
    conn = await api_connection.connect(args)
    conn.write_message(json.dumps({"m": "queue.pop", "p": {"t": ["auth"]}, "i": "pop"}))
    print(f"backend: consuming topic 'auth' on {api_url}", flush=True)
    calls = 0
    while True:
        raw = await conn.read_message()
        if raw is None:
            print("backend: the API connection was closed", file=sys.stderr)
            return
        message = json.loads(raw)
        if message.get("e") != "queue.pop":
            if message.get("E"):
                print(f"backend: error {message['E']}", file=sys.stderr, flush=True)
            continue
        request = message["p"]["d"]
        uid = uid_for(str(request.get("token", "")))
        if uid is None:
            print(f"backend: refused a token from client {request.get('client_id')}", flush=True)
            continue
        calls += 1
        conn.write_message(json.dumps({
            "m": "conn.call", "i": calls,
            "p": {"c": request["client_id"], "f": "set_context_value", "a": ["uid", uid]},
        }))
        print(f"backend: client {request['client_id']} is user {uid}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    api_connection.add_options(parser)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        sys.exit(f"backend: cannot reach {args.api}: {exc}")


if __name__ == "__main__":
    main()
