"""A queue consumer: prints what clients send, one JSON event per line.

Usage:
    python examples/consumer.py [--api ws://127.0.0.1:6789/ws/v1] [--topic default] [--user NAME] [--ack]

Connects to the backend WebSocket API, sends `queue.pop` for the topic and
prints every `queue.pop` event it then receives on its own line as JSON (the
confirmation and errors go to stderr). With the default entry, a client's
message is in `p.d.frame`, and `p.c` is the client_id to answer with
`/v1/mesh/send`. Ctrl-C exits (closing the connection stops the consumption);
when the server closes the connection it exits with status 1. With API users
configured, `--user NAME` sends credentials (password from MESHGATE_PASSWORD,
or asked). With `--ack` it consumes at least once (docs/protocol.md, Queue
acknowledgements) and acknowledges each event after printing it: an event it
printed but could not acknowledge (Ctrl-C, a lost connection) goes to a
consumer again, with `p.a` one higher. Only tornado is needed.
"""

import argparse
import asyncio
import json
import sys

from tornado.httpclient import HTTPClientError

import api_connection


async def consume(args) -> int:
    api, topic = args.api, args.topic
    conn = await api_connection.connect(args)
    pop = {"t": [topic], "ack": True} if args.ack else {"t": [topic]}
    await conn.write_message(json.dumps({"m": "queue.pop", "p": pop, "i": 1}))
    acks = 1   # the id of the last request sent: 1 is the queue.pop, then one queue.ack per event
    while True:
        message = await conn.read_message()
        if message is None:
            print("consumer: the API connection was closed", file=sys.stderr)
            return 1
        envelope = json.loads(message)
        if envelope.get("e") == "queue.pop":
            print(json.dumps(envelope, ensure_ascii=False), flush=True)
            if args.ack:   # printed (and flushed) first: then it is done with
                acks += 1
                await conn.write_message(json.dumps({"m": "queue.ack", "p": {"k": [envelope["p"]["k"]]}, "i": acks}))
        elif envelope.get("E"):
            method = "queue.pop" if envelope.get("i") == 1 else "queue.ack"
            print(f"consumer: {method} failed: {envelope['E']}", file=sys.stderr)
            return 1
        elif envelope.get("i") == 1:
            mode = "at least once" if args.ack else "at most once"
            print(f"consumer: consuming topic {topic!r} on {api} ({mode})", file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print the queue events of one topic.")
    api_connection.add_options(parser)
    parser.add_argument("--topic", default="default", help="topic to consume (the server's `topic` option)")
    parser.add_argument("--ack", action="store_true",
                        help="consume at least once: acknowledge each event after printing it")
    args = parser.parse_args()
    try:
        sys.exit(asyncio.run(consume(args)))
    except KeyboardInterrupt:
        pass
    except (OSError, HTTPClientError) as exc:
        sys.exit(f"consumer: cannot connect to {args.api}: {exc}")
