"""send / publish / conn.call to a client anywhere in the mesh, and what peers ask of this node.

Local first or remote: the owner of a client is read from its id
(cluster/ids.py); a channel's subscribers are wherever `Routing` says. A
request a peer forwards here is served locally only, never sent on
(one hop). Every forwarded request ends within the forward timeout
(node/mesh_point.py) and becomes the protocol's error when it fails
(docs/protocol.md, mesh.send, mesh.publish, conn.call). Owned by the node's
IOLoop.
"""

import asyncio
from functools import partial
from typing import Callable

from cluster import mesh
from cluster.ids import node_id_of
from cluster.protocol import SENT, ApiError, ErrorCode
from node.mesh_point import BadReply, LinkDown, Outcome, PeerTimeout, PeerUnavailable, PeerUnreachable, TooLarge


class Deferred(Outcome):
    """A call that waits for a peer, with no Future and no task: MeshPoint.request fills it with the
    peer's reply or the error (it is the request's `Outcome`); `finish(self)` is then the call's result,
    or raises its ApiError. Whoever waits for it says what follows with `when_done` (the executor), or
    awaits `future()` (an entry). Made once per forwarded request: no more than it needs."""
    __slots__ = ("finish",)

    def __init__(self, finish: Callable = None):
        Outcome.__init__(self)
        self.finish = finish

    def then(self, after: Callable) -> "Deferred":
        """The same call, its result passed through `after(result)`."""
        self.finish = partial(_then, self.finish, after)
        return self


class Forwarder:
    """Args:
        routing: the node's Routing.
        hub: the local Hub (clients and subscriptions).
        mesh_point: the MeshPoint to reach peers.
        call_local: `async (client_id, function, args) -> result` runs a conn.call function
            on a local client (node/api.py).
        adverts: the node's Adverts (peers' adverts are applied there).
        queues: the node's QueueDispatch (queue events from peers).
    """

    def __init__(self, routing, hub, mesh_point, call_local, adverts, queues):
        self.routing = routing
        self.hub = hub
        self.mesh_point = mesh_point
        self.call_local = call_local
        self.adverts = adverts
        self.queues = queues
        self._handlers = {
            mesh.Send: self.handle_send, mesh.Publish: self.handle_publish, mesh.Call: self.handle_call,
            mesh.QueueEvent: self.handle_queue_event, mesh.PeerAdvert: self.handle_peer_advert,
        }

    # --- outbound ----------------------------------------------------------------------

    def send(self, client_id: int, frame: bytes):
        """Delivers one encoded frame to a client anywhere in the mesh.

        Returns None when it was written here, or a `Deferred` that ends when
        the client's node wrote it, its result protocol.SENT (nothing to wait for on the local path).

        Raises:
            ApiError(401): not connected anywhere, owner dead, silent or unreachable, or the write failed.
        """
        owner = node_id_of(client_id)
        if owner == self.routing.node_id:
            return _check_written(client_id, self.hub.send(client_id, frame))
        if owner not in self.routing.nodes:
            return _check_written(client_id, None)
        # Asked now, not when a task first runs: requests keep the order they were made in.
        return self.mesh_point.request(owner, mesh.send_request(client_id, frame),
                                       then=Deferred(partial(_sent_remote, owner, client_id)))

    def publish(self, channels: list, frame: bytes):
        """Delivers one encoded frame to every subscriber of `channels` in the mesh, once each.

        Returns `(s, f)` when no peer has subscribers, a `Deferred` of it for one peer, else an awaitable.
        """
        peers = self.routing.interested_peers(channels)
        # Peers first: ZeroMQ sends on its own thread, so they fan out while this node does.
        if len(peers) == 1:
            [(peer, peer_channels)] = peers.items()
            waiting = self.mesh_point.request(peer, mesh.publish_request(peer_channels, frame), then=Deferred())
            written, failed = self.hub.publish(channels, frame)
            waiting.finish = partial(self._count_peer, peer, peer_channels, written, failed)
            return waiting
        pending = [self.mesh_point.request(peer, mesh.publish_request(peer_channels, frame))
                   for peer, peer_channels in peers.items()]
        written, failed = self.hub.publish(channels, frame)
        if not pending:
            return written, failed
        return self._count_peers(peers, pending, written, failed)

    def _count_peer(self, peer: int, peer_channels: list, written: int, failed: int, reply) -> tuple:
        result = None if reply.exception() is not None else reply.result()   # a PeerError: no usable answer
        if isinstance(result, mesh.Delivered):
            return written + result.written, failed + result.failed
        return written, failed + self.routing.interest_count(peer, peer_channels)   # as last advertised

    async def _count_peers(self, peers: dict, pending: list, written: int, failed: int) -> tuple:
        for (peer, peer_channels), reply in zip(peers.items(), pending):
            await asyncio.wait([reply])
            written, failed = self._count_peer(peer, peer_channels, written, failed, reply)
        return written, failed

    def call(self, client_id: int, function: str, args: list):
        """Runs a conn.call function on a client anywhere in the mesh: an awaitable, or a `Deferred`, of `r`.

        Raises (from the awaitable, or the Deferred's `finish`):
            ApiError(301): client not connected anywhere, or the function failed.
            ApiError(501): the owner did not answer in time, or its mesh link is down.
        """
        owner = node_id_of(client_id)
        if owner == self.routing.node_id:
            return self.call_local(client_id, function, args)
        if owner not in self.routing.nodes:
            return _fail(ApiError(ErrorCode.CALL_FAILED, f"client {client_id} is not connected"))
        # Asked now, not when a task first runs: requests keep the order they were made in.
        return self.mesh_point.request(owner, mesh.call_request(client_id, function, args),
                                       then=Deferred(partial(_called_remote, owner, client_id)))

    # --- inbound -----------------------------------------------------------------------

    def serve(self, kind: type, handler) -> None:
        """Peers' requests of `kind` (a cluster/mesh.py class) go to `handler(message)` -> result bytes."""
        self._handlers[kind] = handler

    def handle(self, peer: bytes, request: mesh.Request):
        """Serves one request of a peer (MeshPoint.handle_request): result bytes or an awaitable of them."""
        return self._handlers[type(request.message)](request.message)

    def handle_send(self, send: mesh.Send) -> bytes:
        return mesh.send_result(self.hub.send(send.client_id, send.frame))

    def handle_publish(self, publish: mesh.Publish) -> bytes:
        return mesh.publish_result(*self.hub.publish(publish.channels, publish.frame))

    async def handle_call(self, call: mesh.Call) -> bytes:
        try:
            result = await self.call_local(call.client_id, call.function, call.args)
        except ApiError as exc:
            return mesh.failure(exc.code, exc.message)
        return mesh.call_result(result)

    def handle_queue_event(self, event: mesh.QueueEvent) -> bytes:
        return self.queues.handle_queue_event(event)

    def handle_peer_advert(self, advert: mesh.PeerAdvert) -> bytes:
        self.queues.drain_all(self.adverts.handle_peer_advert(advert))
        return mesh.advert_result()


def _check_written(client_id: int, written) -> None:
    """A send's outcome (True written, False failed, None no such client) as the protocol's error."""
    if written is None:
        raise ApiError(ErrorCode.SEND_FAILED, f"client {client_id} is not connected")
    if not written:
        raise ApiError(ErrorCode.SEND_FAILED, f"client {client_id}: write failed")


async def _fail(error: Exception):
    raise error


def _sent_remote(owner: int, client_id: int, reply) -> dict:
    """The outcome of a forwarded send (a done Deferred): protocol.SENT, mesh.send's result, when written."""
    error = reply.exception()
    if error is None:
        written = reply.result()
        if written is True:   # the commonest outcome, first
            return SENT
    elif isinstance(error, PeerTimeout):
        raise ApiError(ErrorCode.SEND_FAILED,
                       f"client {client_id}: its node {owner} did not answer within the forward timeout")
    elif isinstance(error, (BadReply, TooLarge, PeerUnreachable, LinkDown)):
        raise ApiError(ErrorCode.SEND_FAILED, f"client {client_id}: {error}")
    else:
        written = None   # PeerUnavailable: not connected
    if isinstance(written, mesh.Failure):
        raise ApiError(ErrorCode.SEND_FAILED, f"client {client_id}: its node {owner} failed: {written.message}")
    _check_written(client_id, written)
    return SENT


def _called_remote(owner: int, client_id: int, reply) -> dict:
    """The outcome of a forwarded conn.call."""
    error = reply.exception()
    if isinstance(error, PeerUnavailable):
        raise ApiError(ErrorCode.CALL_FAILED, f"client {client_id} is not connected")
    if isinstance(error, PeerTimeout):
        raise ApiError(ErrorCode.MESH_UNAVAILABLE,
                       f"client {client_id}: its node {owner} did not answer within the forward timeout")
    if error is not None:   # BadReply, TooLarge, PeerUnreachable, LinkDown
        raise ApiError(ErrorCode.MESH_UNAVAILABLE, f"client {client_id}: {error}")
    result = reply.result()
    if isinstance(result, mesh.Failure):
        raise ApiError(result.code, result.message)
    return result


def _then(finish, after, future):
    return after(finish(future))
