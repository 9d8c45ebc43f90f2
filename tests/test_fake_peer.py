"""A raw ZeroMQ DEALER that holds the cluster key speaks cluster/mesh.py frames to a real node's mesh point."""

import json
import struct
import urllib.request

import pytest
import zmq

from cluster import mesh, protocol
from conftest import WAIT, dealer

FRAME = protocol.encode_ws_frame(b"x")
pytestmark = pytest.mark.parametrize("cluster", [{"key_file": True}], indirect=True)


@pytest.fixture
def peer(cluster):
    """A DEALER with the cluster key, connected to the mesh point of one live node of the cluster."""
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.coordinator_port}/v1/nodes", timeout=WAIT) as response:
        node = json.loads(response.read())["nodes"][0]
    context = zmq.Context()
    socket = dealer(context, node["mesh_point"], cluster.key)
    yield node, socket
    socket.close()
    context.term()


def _ask(socket, message: mesh.Outbound, request_id=7):
    socket.send_multipart(mesh.frame_request(message, request_id))
    got_id, raw = mesh.read_reply(socket.recv_multipart())
    assert got_id == request_id
    return mesh.read_result(message.kind, raw)


def test_node_answers_requests_for_what_it_does_not_have(peer):
    """SEND/CALL/QEV for unknown clients or consumers are answered, not dropped or crashed on."""
    node, socket = peer
    unknown = (node["node_id"] << 12) | 1
    assert _ask(socket, mesh.send_request(unknown, FRAME)) is None
    assert _ask(socket, mesh.publish_request(["nobody-listens"], FRAME)) == mesh.Delivered(0, 0)
    assert _ask(socket, mesh.call_request(unknown, "get_context", [])).code == protocol.ErrorCode.CALL_FAILED
    event = protocol.queue_event(node["node_id"], unknown, "default", {"frame": {}})
    assert _ask(socket, mesh.queue_event_request("default", 999999, event)) is False


def test_bad_frames_are_ignored_and_the_node_keeps_answering(peer, cluster):
    """Wrong frame counts, unknown kinds, bad JSON and bad fields get no reply; the next good request is answered."""
    node, socket = peer
    socket.send_multipart([b"SEND", b"x"])
    socket.send_multipart([b"\x63" + bytes(12)])
    socket.send_multipart([struct.pack("!BQI", 1, 2, 9) + b"{not json"])
    socket.send_multipart([struct.pack("!BQI", 1, 3, 3) + b"[1]"])
    socket.send_multipart([struct.pack("!BQI", 1, 4, 500) + b"{}"])
    socket.send_multipart(mesh.frame_request(mesh.Outbound(mesh.Send, b'{"c": "1"}', FRAME), 5))
    socket.send_multipart(mesh.frame_request(mesh.Outbound(mesh.Send, b'{"c": 1}', b"raw bytes"), 6))
    assert _ask(socket, mesh.publish_request(["still-alive"], FRAME)) == mesh.Delivered(0, 0)
    assert len(cluster.status()["nodes"]) == cluster.workers


def test_adverts_of_a_node_nobody_lists_are_not_kept(peer, cluster):
    """Interest advertised for a node the routing table does not list is dropped (a key holder cannot fill it)."""
    node, socket = peer
    ghost = f"ghost-{node['node_id']}"
    socket.send_multipart(mesh.frame_request(mesh.advert_request(999, interest=[[ghost, 7, 1]]), 0))
    assert _ask(socket, mesh.publish_request(["still-alive"], FRAME)) == mesh.Delivered(0, 0)   # the advert was read
    api_reply = cluster.http("/v1/mesh/publish", {"c": ghost, "d": "x"})[1]
    assert api_reply["r"] == {"s": 0, "f": 0}


def _replies(socket, count: int) -> dict:
    """`{request_id: result bytes}` of the next `count` replies, however the node batched them."""
    got = {}
    while len(got) < count:
        for frame in mesh.batch(socket.recv_multipart()):
            request_id, raw = mesh.read_reply([frame])
            assert request_id not in got
            got[request_id] = raw
    return got


def test_a_batch_of_requests_in_one_message_is_served_in_order(peer):
    """Several mesh messages in one ZeroMQ message (one per frame) each get their reply; a bad one only loses itself."""
    node, socket = peer
    unknown = (node["node_id"] << 12) | 1
    socket.send_multipart([
        mesh.frame_request(mesh.publish_request(["batched"], FRAME), 11)[0],
        struct.pack("!BQI", 1, 12, 9) + b"{not json",
        mesh.frame_request(mesh.send_request(unknown, FRAME), 13)[0],
        mesh.frame_request(mesh.publish_request(["batched-too"], FRAME), 14)[0],
    ])
    got = _replies(socket, 3)
    assert sorted(got) == [11, 13, 14]
    assert mesh.read_result(mesh.Publish, got[11]) == mesh.Delivered(0, 0)
    assert mesh.read_result(mesh.Send, got[13]) is None


def test_a_batch_over_the_frame_bound_is_refused_whole(peer):
    """More than mesh.MAX_BATCH frames in one message: nothing of it is served, and the node keeps answering."""
    node, socket = peer
    request = mesh.frame_request(mesh.publish_request(["too-many"], FRAME), 21)[0]
    socket.send_multipart([request] * (mesh.MAX_BATCH + 1))
    assert _ask(socket, mesh.publish_request(["still-alive"], FRAME), request_id=22) == mesh.Delivered(0, 0)


def test_a_packed_batch_is_served_and_a_cut_one_refused_whole(peer):
    """Requests packed into one frame (mesh.pack) each get their reply; a batch cut short gets none."""
    node, socket = peer
    requests = [mesh.frame_request(mesh.publish_request([f"packed-{n}"], FRAME), 30 + n)[0] for n in range(5)]
    socket.send_multipart([mesh.pack(requests)])
    got = _replies(socket, 5)
    assert sorted(got) == list(range(30, 35))
    assert all(mesh.read_result(mesh.Publish, raw) == mesh.Delivered(0, 0) for raw in got.values())
    socket.send_multipart([mesh.pack(requests)[:-3]])
    assert _ask(socket, mesh.publish_request(["still-alive"], FRAME), request_id=40) == mesh.Delivered(0, 0)
