"""The data plane of one node process: local first, then the mesh, never back into the mesh.

`Node` ties the local hub (clients.py), topic buffers and consumers
(queues.py), the cached routing tables (routing.py), the mesh point
(mesh_point.py) and the coordinator link (control.py) together. A request a
peer forwards here is served locally only. Owned by the node's IOLoop.
"""

import asyncio
import logging
import time

import psutil
import ujson

from cluster import mesh, protocol
from cluster.ids import IdGenerator, node_id_of
from cluster.protocol import ApiError, ErrorCode
from node.clients import Counters, Hub, write_frame
from node.mesh_point import MeshPoint, PeerTimeout, PeerUnavailable
from node.queues import Buffers, Consumers, QueueFull
from node.routing import Routing

log = logging.getLogger("meshgate.node")

_ADVERT_FLUSH_S = 0.02
_DRAIN_BATCH = 10000
_RETRY_S = 0.05   # pause before handing out events again after a peer could not be reached


class Node:
    """Args:
        config: the cluster Config.
        worker: this process's index among the host's node processes (0-based).
        context: the process's zmq.Context.
    """

    def __init__(self, config, worker: int, context):
        self.config = config
        self.worker = worker
        self.forward_timeout = config.node.forward_timeout
        self.node_id = 0
        self.ids = None
        self.routing = Routing(0)
        self.counters = Counters()
        self.hub = Hub(self.counters)
        queue = config.node.queue
        self.buffers = Buffers(queue.topic_size, queue.max_topics, queue.max_bytes, size_of=lambda item: len(item[2]))
        self.consumers = Consumers()
        self.api_sockets = set()   # open /ws/v1 connections (node/api_ws.py)
        self.ready = asyncio.Event()
        self.started_at = time.time()
        self.queue_lost = 0
        self._arrivals = 0          # arrival sequence of queue pushes (keeps per-client order on retries)
        listen = config.node.mesh
        port = listen.port + worker if listen.port else 0
        self.mesh = MeshPoint(context, f"tcp://{listen.bind}:{port}", self.handle_mesh_request, self.forward_timeout,
                              listen.max_pending_bytes)
        host = config.node.advertise
        host = f"[{host}]" if ":" in host else host   # an IPv6 address
        self.mesh_point = f"tcp://{host}:{self.mesh.address.rpartition(':')[2]}"
        self.api_server = f"{host}:{config.node.api.port}"
        self._seq = 0
        self._dirty_interest = {}
        self._dirty_consumers = []
        self._opened = []
        self._closed = []
        self._flush_handle = None
        self._interest_waits = {}     # channel -> future of the peers' acks
        self._process = psutil.Process()
        self._process.cpu_percent(None)
        self._last_stats = (time.monotonic(), 0, 0)
        from node.control import ControlLink  # the link calls back into this object
        self.link = ControlLink(self, context)

    # --- registration and routing -----------------------------------------

    def on_welcome(self, node_id: int, not_before_ms: int, snapshot: dict) -> None:
        """The coordinator gave this process its node id (first time) or took it back after a restart."""
        if self.node_id and node_id != self.node_id:
            raise RuntimeError(f"coordinator gave node id {node_id}, this process holds {self.node_id}")
        if not self.node_id:
            self.node_id = node_id
            self.ids = IdGenerator(node_id, not_before_ms)
            self.routing = Routing(node_id)
            changes = self.routing.load_snapshot(snapshot)
        else:
            # The coordinator restarted: it lists only the nodes back so far. Keep the
            # others (the data plane goes on) until they had time to come back.
            keep_until = time.monotonic() + 2 * self.config.coordinator.node_timeout + 1
            changes = self.routing.merge_snapshot(snapshot, keep_until)
        self.on_routing_changed(*changes)
        self.ready.set()

    def expire_unconfirmed(self) -> None:
        """Called with each heartbeat: drop peers a restarted coordinator never listed again."""
        changes = self.routing.expire_unconfirmed(time.monotonic())
        if changes[1]:
            log.warning("nodes %s did not come back after the coordinator restarted; dropped",
                        ", ".join(map(str, sorted(changes[1]))))
            self.on_routing_changed(*changes)

    def on_routing_changed(self, added: set, removed: set, topics: set) -> None:
        for node_id in removed:
            self.mesh.disconnect(node_id)
        connected = set(self.mesh.connected())
        for node_id in self.routing.peer_ids():
            if node_id in added or node_id not in connected:
                address = self.routing.nodes[node_id].get("mesh_point")
                try:
                    self.mesh.connect(node_id, address, self.node_id)
                except Exception as exc:   # one bad peer must not stop this node from serving
                    log.error("cannot link to node %d at %r: %s", node_id, address, exc)
        for topic in topics:
            self.drain(topic)

    def full_state(self) -> dict:
        """Everything this node advertises, for a (re-)registration."""
        return {
            "interest": [[channel, len(members), self.next_seq()] for channel, members in self.hub.subs.items()],
            "consumers": [[topic, consumer_id, 1, self.next_seq()]
                          for consumer_id, topics in self.consumers.topics.items() for topic in topics],
            "clients": list(self.hub.conns),
        }

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # --- adverts -------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(_ADVERT_FLUSH_S, self.flush_adverts)

    def flush_adverts(self) -> None:
        """Sends the coalesced changes of the last few milliseconds to the coordinator."""
        self._flush_handle = None
        body = {}
        if self._dirty_interest:
            body["interest"] = [[c, n, self.next_seq()] for c, n in self._dirty_interest.items()]
            self._dirty_interest = {}
        if self._dirty_consumers:
            body["consumers"], self._dirty_consumers = self._dirty_consumers, []
        if self._opened:
            body["opened"], self._opened = self._opened, []
        if self._closed:
            body["closed"], self._closed = self._closed, []
        if body:
            self.link.send(mesh.ADVERT, body)

    def _interest_changed(self, changes: list) -> list:
        """Records subscriber-count changes; returns futures to await before a subscribe may reply.

        A channel's first subscriber (or its last leaving) is told to every
        peer at once, all channels of one call in one advert per peer; the
        first kind is acknowledged (PROTOCOL.md, conn.call guarantee). Counts
        reach the coordinator in the next coalesced flush.
        """
        waits, gained, lost = [], [], []
        for channel, count in changes:
            self._dirty_interest[channel] = count
            if count == 1:
                gained.append([channel, 1, self.next_seq()])
            elif count == 0:
                lost.append([channel, 0, self.next_seq()])
            else:
                wait = self._interest_waits.get(channel)
                if wait is not None:
                    waits.append(wait)
        peers = self.routing.peer_ids()
        if lost:
            for peer in peers:
                self.mesh.notify(peer, mesh.ADVERT, {"o": self.node_id, "interest": lost})
        if gained:
            header = {"o": self.node_id, "interest": gained}
            # A silent peer is waited for at most half the forward timeout: it is
            # likely dead, and a dead peer cannot publish.
            wait = asyncio.gather(*[self.mesh.request(peer, mesh.ADVERT, header, timeout=self.forward_timeout / 2)
                                    for peer in peers], return_exceptions=True)
            for channel, _, _ in gained:
                self._interest_waits[channel] = wait
            wait.add_done_callback(lambda _, names=[c for c, _, _ in gained], w=wait: self._forget_waits(names, w))
            waits.append(wait)
        if changes:
            self._schedule_flush()
        return waits

    def _forget_waits(self, channels: list, wait) -> None:
        for channel in channels:
            if self._interest_waits.get(channel) is wait:
                del self._interest_waits[channel]

    def _consumer_changed(self, consumer_id: int, topics: list, present: bool) -> None:
        items = [[topic, consumer_id, int(present), self.next_seq()] for topic in topics]
        self.routing.apply_changes((), [[self.node_id, *item] for item in items])
        header = {"o": self.node_id, "consumers": items}
        for peer in self.routing.peer_ids():
            self.mesh.notify(peer, mesh.ADVERT, header)
        self._dirty_consumers.extend(items)
        self._schedule_flush()
        if present:   # after the queue.pop reply has gone out (PROTOCOL.md: reply, then events)
            loop = asyncio.get_running_loop()
            for topic in topics:
                loop.call_soon(self.drain, topic)

    # --- clients ---------------------------------------------------------------

    def client_opened(self, conn) -> None:
        self.hub.add(conn)
        self._opened.append(conn.client_id)
        self._schedule_flush()

    def client_closed(self, conn) -> None:
        if self.hub.conns.get(conn.client_id) is not conn:
            return
        self._interest_changed(self.hub.remove(conn))
        self._closed.append(conn.client_id)
        self._schedule_flush()

    def subscribe_now(self, conn, channels: list) -> asyncio.Future:
        """Subscribes a local connection at once; the future completes when every peer knows.

        PROTOCOL.md, conn.call guarantee: a publish issued anywhere after the
        future completes reaches the connection.
        """
        if self.hub.conns.get(conn.client_id) is not conn:   # closed meanwhile: nothing to do
            waits = []
        else:
            waits = self._interest_changed(self.hub.subscribe(conn, channels))
        if waits:
            return asyncio.gather(*waits)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def subscribe(self, conn, channels: list) -> None:
        await self.subscribe_now(conn, channels)

    def unsubscribe(self, conn, channels: list) -> None:
        self._interest_changed(self.hub.unsubscribe(conn, channels))

    # --- send, publish, call -------------------------------------------------

    async def send(self, client_id: int, frame: bytes) -> None:
        """Delivers one frame to a client anywhere in the mesh (PROTOCOL.md, mesh.send).

        Raises:
            ApiError(401): not connected anywhere, owner dead or silent, or the write failed.
        """
        owner = node_id_of(client_id)
        if owner == self.node_id:
            written = self.hub.send(client_id, frame)
        elif owner not in self.routing.nodes:
            written = None
        else:
            try:
                result = await self.mesh.request(owner, mesh.SEND, {"c": client_id}, frame)
            except PeerTimeout:
                raise ApiError(ErrorCode.SEND_FAILED, f"client {client_id}: its node {owner} did not answer within the forward timeout")
            except PeerUnavailable:
                written = None
            else:
                written = result.get("s")
        if written is None:
            raise ApiError(ErrorCode.SEND_FAILED, f"client {client_id} is not connected")
        if not written:
            raise ApiError(ErrorCode.SEND_FAILED, f"client {client_id}: write failed")

    async def publish(self, channels: list, frame: bytes) -> tuple:
        """Delivers one frame to every subscriber of `channels` in the mesh; returns `(s, f)`."""
        written, failed = self.hub.publish(channels, frame)
        peers = self.routing.interested_peers(channels)
        if not peers:
            return written, failed
        results = await asyncio.gather(*[self.mesh.request(peer, mesh.PUBLISH, {"ch": peer_channels}, frame)
                                          for peer, peer_channels in peers.items()], return_exceptions=True)
        for (peer, peer_channels), result in zip(peers.items(), results):
            if isinstance(result, BaseException):
                failed += self.routing.interest_count(peer, peer_channels)
            else:
                written += result.get("s", 0)
                failed += result.get("f", 0)
        return written, failed

    async def call(self, client_id: int, function: str, args: list):
        """Runs a conn.call function on a client anywhere in the mesh; returns the result `r`.

        Raises:
            ApiError(301): client not connected anywhere, or the function failed.
            ApiError(501): the owner did not answer in time.
        """
        owner = node_id_of(client_id)
        if owner == self.node_id:
            return await self.call_local(client_id, function, args)
        if owner not in self.routing.nodes:
            raise ApiError(ErrorCode.CALL_FAILED, f"client {client_id} is not connected")
        try:
            reply = await self.mesh.request(owner, mesh.CALL, {"c": client_id, "f": function, "a": args})
        except PeerTimeout:
            raise ApiError(ErrorCode.MESH_UNAVAILABLE, f"client {client_id}: its node {owner} did not answer within the forward timeout")
        except PeerUnavailable:
            raise ApiError(ErrorCode.CALL_FAILED, f"client {client_id} is not connected")
        if "e" in reply:
            raise ApiError(reply["e"], reply.get("m", "call failed"))
        return reply.get("r")

    async def call_local(self, client_id: int, function: str, args: list):
        conn = self.hub.conns.get(client_id)
        if conn is None:
            raise ApiError(ErrorCode.CALL_FAILED, f"client {client_id} is not connected")
        if function == "set_context_value":
            conn.set_context_value(args[0], args[1])
        elif function == "set_context":
            conn.set_context(args[0])
        elif function == "subscribe":
            await self.subscribe(conn, args)
        elif function == "unsubscribe":
            self.unsubscribe(conn, args)
        elif function == "close":
            conn.close(*args) if args else conn.close(1000)
        elif function == "get_context":
            try:   # an entry may have put something in that JSON cannot carry
                ujson.dumps(conn.context)
            except (TypeError, OverflowError, ValueError):
                raise ApiError(ErrorCode.CALL_FAILED, f"client {client_id}: its context holds a value that is not JSON")
            return {"s": True, "d": conn.context}
        return {"s": True}

    # --- queues ----------------------------------------------------------------

    def queue_push(self, topic: str, client_id: int, data) -> None:
        """Pushes what a client sent to a topic (PROTOCOL.md, queue.pop delivery semantics).

        Raises:
            QueueFull: no consumer can take it now and the topic's buffer is full.
        """
        event = protocol.queue_event(self.node_id, client_id, topic, data)
        self._arrivals += 1
        if self.buffers.waiting(topic) or not self.routing.has_consumers(topic):
            self.buffers.push(topic, (self._arrivals, client_id, event))
            if self.routing.has_consumers(topic):
                self.drain(topic)
            return
        self.dispatch(topic, self._arrivals, client_id, event)

    def dispatch(self, topic: str, seq: int, client_id: int, event: bytes) -> bool:
        """Hands one event to the consumer its client maps to; puts it back in order when none can take it."""
        for _ in range(64):
            target = self.routing.pick_consumer(topic, client_id)
            if target is None:
                break
            origin, consumer_id = target
            if origin != self.node_id:
                future = self.mesh.request(origin, mesh.QUEUE_EVENT, {"t": topic, "k": consumer_id}, event)
                future.add_done_callback(
                    lambda f: self._on_event_reply(f, topic, (seq, client_id, event), origin, consumer_id))
                return True
            conn = self.consumers.connection(consumer_id, topic)
            if conn is not None and write_frame(conn, protocol.encode_ws_frame(event), self.counters):
                return True
            self.routing.forget_consumer(origin, topic, consumer_id)
        self.buffers.put_back(topic, (seq, client_id, event))
        return False

    def _on_event_reply(self, future, topic, item, origin, consumer_id) -> None:
        error = future.exception()
        if isinstance(error, PeerTimeout):
            self.queue_lost += 1   # at most once: it may have been written
            return
        if error is None and future.result().get("ok"):
            return
        # Not there any more (or no link to its node): stop choosing it; its
        # node's advert or the coordinator will say the rest.
        self.routing.forget_consumer(origin, topic, consumer_id)
        self.buffers.put_back(topic, item)
        loop = asyncio.get_running_loop()
        if error is None:
            loop.call_soon(self.drain, topic)
        else:
            loop.call_later(_RETRY_S, self.drain, topic)

    def drain(self, topic: str) -> None:
        """Delivers what waits for `topic`, oldest first, while it has consumers."""
        for _ in range(_DRAIN_BATCH):
            if not self.routing.has_consumers(topic):
                return
            item = self.buffers.pop(topic)
            if item is None:
                return
            if not self.dispatch(topic, *item):
                return
        asyncio.get_running_loop().call_soon(self.drain, topic)

    def consume(self, consumer_id: int, conn, topics: list) -> None:
        """Registers a consumer's topics (PROTOCOL.md, queue.pop).

        Raises:
            ApiError(202): it already consumes one of them; ApiError(201): over the per-consumer topic limit.
        """
        try:
            self.consumers.add(consumer_id, conn, topics)
        except ValueError as exc:
            if str(exc) == "repeated":
                raise ApiError(ErrorCode.REPEATED_CONSUMPTION, "p.t: this connection already consumes one of these topics")
            raise ApiError(ErrorCode.CONSUME_FAILED,
                           f"p.t: a connection may consume at most {self.consumers.max_topics_per_consumer} topics")
        self._consumer_changed(consumer_id, topics, True)

    def stop_consuming(self, consumer_id: int, topics=None) -> None:
        gone = self.consumers.remove(consumer_id, topics)
        if gone:
            self._consumer_changed(consumer_id, gone, False)

    # --- requests from peers ---------------------------------------------------

    def handle_mesh_request(self, peer: bytes, request):
        kind, header = request.kind, request.header
        if kind == mesh.PUBLISH:
            written, failed = self.hub.publish(header["ch"], request.body)
            return {"s": written, "f": failed}
        if kind == mesh.SEND:
            written = self.hub.send(header["c"], request.body)
            return {"s": bool(written)} if written is not None else {"s": None}
        if kind == mesh.QUEUE_EVENT:
            conn = self.consumers.connection(header["k"], header["t"])
            ok = conn is not None and write_frame(conn, protocol.encode_ws_frame(request.body), self.counters)
            return {"ok": ok}
        if kind == mesh.ADVERT:
            origin = header["o"]
            interest = [[origin, *item] for item in header.get("interest", ())]
            # A consumer can only be chosen on a node we can reach; the coordinator
            # relays the same change once it lists that node.
            consumers = [[origin, *item] for item in header.get("consumers", ())] \
                if origin in self.routing.nodes else []
            for topic in self.routing.apply_changes(interest, consumers):
                self.drain(topic)
            return {"ok": True}
        if kind == mesh.CALL:
            return self._handle_call(header)
        return {"e": int(ErrorCode.INVALID_PARAMS), "m": "unknown request"}

    async def _handle_call(self, header: dict) -> dict:
        try:
            return {"r": await self.call_local(header["c"], header["f"], header["a"])}
        except ApiError as exc:
            return {"e": int(exc.code), "m": exc.message}

    # --- figures -----------------------------------------------------------------

    def stats(self) -> dict:
        now = time.monotonic()
        counters = self.counters
        last_time, last_in, last_out = self._last_stats
        elapsed = max(now - last_time, 1e-3)
        self._last_stats = (now, counters.in_total, counters.out_total)
        return {
            "clients": len(self.hub.conns), "channels": len(self.hub.subs), "consumers": self.consumers.count(),
            "queue_depth": self.buffers.depth(), "queue_dropped": self.buffers.dropped + self.queue_lost,
            "in_total": counters.in_total, "out_total": counters.out_total,
            "in_rate": round((counters.in_total - last_in) / elapsed, 1),
            "out_rate": round((counters.out_total - last_out) / elapsed, 1),
            "slow_closed": counters.slow_closed, "forward_timeouts": self.mesh.timeouts,
            "hook_errors": counters.hook_errors, "cpu": self._process.cpu_percent(None),
            "rss": self._process.memory_info().rss, "id_ms": self.ids.last_ms if self.ids else 0,
        }


__all__ = ["Node", "QueueFull"]
