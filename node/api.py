"""One executor behind every transport: one method per API call.

Each method takes the request's parameters (already decoded JSON), returns the
result `r` or raises `ApiError`; the HTTP and WebSocket adapters turn that into
envelopes. PROTOCOL.md is the contract for every method here.
"""

from cluster import protocol
from cluster.protocol import ApiError, ErrorCode


class Api:
    def __init__(self, node):
        self.node = node

    async def mesh_send(self, params, prefix: str = "p.") -> dict:
        """PROTOCOL.md, mesh.send."""
        client_id, payload = protocol.parse_send(params, prefix)
        await self.node.send(client_id, protocol.encode_ws_frame(payload.data, payload.binary))
        return {"s": True}

    async def mesh_publish(self, params, prefix: str = "p.") -> dict:
        """PROTOCOL.md, mesh.publish."""
        channels, payload = protocol.parse_publish(params, prefix)
        written, failed = await self.node.publish(channels, protocol.encode_ws_frame(payload.data, payload.binary))
        return {"s": written, "f": failed}

    async def conn_call(self, params) -> dict:
        """PROTOCOL.md, conn.call."""
        client_id, function, args = protocol.parse_conn_call(params)
        return await self.node.call(client_id, function, args)

    def queue_pop(self, consumer, params) -> dict:
        """PROTOCOL.md, queue.pop: `consumer` is the API connection that will receive the events."""
        topics = protocol.parse_queue_pop(params)
        self.node.consume(consumer.consumer_id, consumer, topics)
        return {"s": True}

    def queue_unpop(self, consumer, params) -> dict:
        """PROTOCOL.md, queue.unpop: all topics of the connection, or the listed ones."""
        topics = protocol.parse_queue_unpop(params)
        try:
            self.node.stop_consuming(consumer.consumer_id, topics)
        except Exception as exc:  # the tables are local; a failure here is a bug, reported as 203
            raise ApiError(ErrorCode.CANCEL_CONSUME_FAILED, f"queue.unpop failed: {exc}") from exc
        return {"s": True}
