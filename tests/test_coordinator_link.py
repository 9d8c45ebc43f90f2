"""node/coordinator_link.py against a stand-in registry: a real ROUTER with the cluster key, on loopback."""

import asyncio
import logging
import time

import zmq

from cluster import cluster_key, config, mesh
from cluster.zloop import ZapHandler, ZSocket, new_socket
from conftest import WAIT
from node.coordinator_link import CoordinatorLink, Identity
from node.routing import Routing

ENTRY = mesh.NodeEntry(1, "h", 1, "127.0.0.1:1", "tcp://127.0.0.1:1", 0, 0.0)


async def _until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def _registration(answers: list) -> list:
    """Runs a CoordinatorLink against a ROUTER that answers its first registration with `answers` (control
    messages, or "register": wait for the next registration); returns the link's changes."""
    context = zmq.Context()
    key = cluster_key.generate()
    zap = ZapHandler(context, key)
    router = new_socket(context, zmq.ROUTER, 100, key, mesh.MAX_CONTROL_BYTES)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    received, changes = [], []
    registry = ZSocket(router, received.append)
    link = CoordinatorLink(context, config.override(config.load(None), coordinator=f"127.0.0.1:{port}"), Routing(),
                           Identity("h", 1, "127.0.0.1:1", "tcp://127.0.0.1:1", 0.0), mesh.NodeState, dict,
                           changes.append, key, lambda: "")
    try:
        link.start()
        await _until(lambda: received, "a registration")
        routing_id = bytes(received[0][0])
        for answer in answers:
            if answer == "register":
                count = sum(frames[1] == b"REG" for frames in received)
                await _until(lambda: sum(frames[1] == b"REG" for frames in received) > count, "a new registration")
            else:
                registry.send([routing_id, *mesh.encode_control(answer)])
        await _until(lambda: len(changes) == sum(type(a) is mesh.Welcome for a in answers), "the welcomes")
    finally:
        link.close()
        registry.close()
        zap.close()
        context.destroy(linger=0)
    return changes


WELCOME = mesh.Welcome(1, 0, mesh.Snapshot(1, [ENTRY]))


def test_a_registration_answered_twice_joins_once(caplog):
    """Two welcomes for one registration (it was retried before the first answer came) are one join, not a comeback."""
    caplog.set_level(logging.INFO, "meshgate.node")
    asyncio.run(_registration([WELCOME, WELCOME]))
    joins = [r.getMessage() for r in caplog.records if "registered as node" in r.getMessage()]
    assert joins == ["registered as node 1 (mesh point tcp://127.0.0.1:1)"]


def test_a_registration_after_reregister_is_logged_as_such(caplog):
    """Told to register again (a restarted coordinator), the node does, and its welcome says re-registered."""
    caplog.set_level(logging.INFO, "meshgate.node")
    asyncio.run(_registration([WELCOME, mesh.Reregister(), "register", WELCOME]))
    joins = [r.getMessage() for r in caplog.records if "registered as node" in r.getMessage()]
    assert joins == ["registered as node 1 (mesh point tcp://127.0.0.1:1)",
                     "re-registered as node 1 (mesh point tcp://127.0.0.1:1)"]
