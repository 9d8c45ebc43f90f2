"""meshgate's bench entry: every client subscribes to the channel `bench` when it opens.

A client that connects with the query string `hello` is also told its
client_id and node (`h <client_id> <node_id>`), once subscribed: the load
generator learns from that which connections to target with `mesh.send`,
without a queue round trip. Plain subscribers get nothing but the fan-out, as
they do from Nchan and the baseline. No `on_message`: client messages go to
the topic `default`, as with the default entry.
"""


async def on_open(conn):
    await conn.subscribe("bench")
    if conn.query == "hello":
        conn.send(f"h {conn.client_id} {conn.node_id}")
