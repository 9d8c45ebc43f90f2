"""The default behaviour written out: every client message goes to the server's topic.

    servers:
      - port: 6790
        entry: entries/queue.py
        topic: default

Each complete message becomes a frame `{"type": "text"|"binary", "data": ...,
"finish": true}`; it is pushed as `{"frame": frame}` to the server's topic
(`conn.topic`), where a backend consumes it with `queue.pop`. When the topic's
buffer is full (no consumer for a while) the message is dropped, counted, and
the client is told.
"""

from node.entry import QueueFull, queue


def on_message(conn, frame):
    try:
        queue.push(conn.topic, {"frame": frame})
    except QueueFull:
        conn.send('{"code":1,"msg":"busy, message dropped"}')
