"""channel.presence and channel.count: who is subscribed to a channel, mesh-wide (docs/protocol.md, Presence).

Exact at the time of the call: this node lists its own subscribers and asks
exactly the peers that routing.py says have some (a `PRES` request each,
bounded by the forward timeout of node/mesh_point.py). A peer that does not
answer in time, or cannot be reached, is listed in `missing` and its
subscribers are not counted. Owned by the node's IOLoop.
"""

import asyncio

from cluster import mesh, protocol
from cluster.ids import to_wire


def local_rows(hub, channel: str, context: bool, limit: int) -> tuple:
    """`(count, rows)` of this node's subscribers of `channel`: at most `limit` rows of
    `[client_id]`, or `[client_id, context]` with `context`."""
    members = hub.subs.get(channel) or ()
    rows = []
    for conn in members:
        if len(rows) >= limit:
            break
        if context:   # a context JSON cannot carry (an entry's doing) is listed as {}
            rows.append([conn.client_id, conn.context if protocol.json_carries(conn.context) else {}])
        else:
            rows.append([conn.client_id])
    return len(members), rows


class Presence:
    """Args:
        node_id: returns this node's id (known once registered).
        routing: the node's Routing (which peers have subscribers of a channel).
        hub: the local Hub.
        mesh_point: the MeshPoint.
    """

    def __init__(self, node_id, routing, hub, mesh_point):
        self._node_id = node_id
        self.routing = routing
        self.hub = hub
        self.mesh_point = mesh_point

    def handle(self, request: mesh.Presence) -> bytes:
        """A peer's PRES request: this node's own subscribers."""
        return mesh.presence_result(*local_rows(self.hub, request.channel, request.context, request.limit))

    def count(self, channel: str):
        """The `r` of channel.count: channel.presence's without the list (a dict, or an awaitable of it)."""
        result = self.query(channel, False, 0)
        return _without_list(result) if type(result) is dict else _counted(result)

    def query(self, channel: str, context: bool, limit: int):
        """The `r` of channel.presence: a dict now when no peer has subscribers, else an awaitable of it."""
        count, rows = local_rows(self.hub, channel, context, limit)
        result = _Gathered(self._node_id(), count, rows, context, limit)
        peers = [peer for peer in self.routing.interested_peers([channel])]
        if not peers:
            return result.reply()
        waiting = [(peer, self.mesh_point.request(peer, mesh.presence_request(channel, context, limit)))
                   for peer in peers]
        return result.gather(waiting)


def _without_list(result: dict) -> dict:
    del result["clients"]
    return result


async def _counted(awaitable) -> dict:
    return _without_list(await awaitable)


class _Gathered:
    """What the nodes answered so far, and who did not."""

    def __init__(self, node_id: int, count: int, rows: list, context: bool, limit: int):
        self.count, self.context, self.limit = count, context, limit
        self.clients = [self._entry(row[0], node_id, row[1] if context else None) for row in rows]
        self.missing = []

    def _entry(self, client_id: int, node_id: int, context) -> dict:
        entry = {"c": to_wire(client_id), "n": node_id}
        if self.context:
            entry["x"] = context if context is not None else {}
        return entry

    async def gather(self, waiting: list) -> dict:
        await asyncio.wait([future for _, future in waiting])
        for peer, future in waiting:
            answer = None if future.exception() is not None else future.result()
            if not isinstance(answer, mesh.Present):   # a timeout, an unreachable peer, a Failure
                self.missing.append(peer)
                continue
            self.count += answer.count
            room = self.limit - len(self.clients)
            self.clients.extend(self._entry(client_id, peer, context) for client_id, context in answer.clients[:room])
        return self.reply()

    def reply(self) -> dict:
        result = {"s": True, "count": self.count, "clients": self.clients}
        if self.missing:
            result["missing"] = sorted(self.missing)
        return result
