"""Tests of node/api.py, the one executor: every outcome becomes one envelope, whatever the method.

The executor is called directly with a stand-in for the node's parts it uses
(`forward`, `queues`, `hub`), so that failures no real node produces on
purpose (a bug in a method) can be tested too. System tests of the same
methods over HTTP and /ws/v1 are in test_api_http.py and test_api_ws.py.
"""

import asyncio
import json
import logging
from types import SimpleNamespace

import pytest

from cluster import protocol
from node import api as api_module
from node.api import ALL_ROLES, Api, Caller, HTTP_CALLER
from node.forward import Deferred
from node.acks import SettingsDiffer
from node.queues import AlreadyConsuming, TooManyTopics
from conftest import names_field

WS = Caller("p.", True, consumer=SimpleNamespace(consumer_id=7))
CLIENT = "1463786910324359168"


class Parts:
    """The node parts the executor reaches; each step is a plain function a test can replace."""

    def __init__(self):
        self.calls = []
        self.config = SimpleNamespace(node=SimpleNamespace(api=SimpleNamespace(access_log=False)))
        self.hub = SimpleNamespace(conns={})
        self.forward = SimpleNamespace(send=self._send, publish=self._publish, call=self._call)
        self.queues = SimpleNamespace(consume=self._consume, stop_consuming=self._stop, ack=self._ack,
                                      consumers=SimpleNamespace(max_topics_per_consumer=3))
        self.presence = SimpleNamespace(query=self._presence, count=self._count)

    # As node/forward.py answers for the local path: at once (a Deferred when a peer must answer).
    def _send(self, client_id, frame):
        self.calls.append(("send", client_id, frame))

    def _publish(self, channels, frame):
        self.calls.append(("publish", channels, frame))
        return 2, 1

    async def _call(self, client_id, function, args):
        self.calls.append(("call", client_id, function, args))
        return {"s": True}

    def _presence(self, channel, context, limit):   # as node/presence.py answers when no peer has subscribers
        self.calls.append(("presence", channel, context, limit))
        return {"s": True, "count": 1, "clients": [{"c": CLIENT, "n": 1}][:limit]}

    def _count(self, channel):   # node/presence.py's count: the same query, without the list
        result = self._presence(channel, False, 0)
        del result["clients"]
        return result

    def _consume(self, consumer_id, conn, topics, ack=None):
        self.calls.append(("consume", consumer_id, topics, ack))

    def _ack(self, consumer_id, delivery_ids):
        self.calls.append(("ack", consumer_id, delivery_ids))
        return len(delivery_ids)

    def _stop(self, consumer_id, topics):
        self.calls.append(("stop", consumer_id, topics))


def run(method, params, caller=WS, parts=None, req_id=5):
    """Executes one call on a fresh loop; returns `(code, decoded envelope, parts)` and checks it replied once."""
    parts = parts or Parts()
    replies = []

    async def main():
        answered = asyncio.get_running_loop().create_future()

        def reply(code, body):
            replies.append((code, body))
            if not answered.done():
                answered.set_result(None)
        Api(parts).execute(method, params, caller, req_id, reply)
        await asyncio.wait_for(answered, 10)
        await asyncio.sleep(0)   # a second reply would come now

    asyncio.run(main())
    assert len(replies) == 1, replies
    code, body = replies[0]
    assert isinstance(body, bytes)
    return code, json.loads(body), parts


def raiser(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


def async_raiser(exc):
    async def fail(*args, **kwargs):
        raise exc
    return fail


# --- the table ------------------------------------------------------------------------------

def test_method_table_is_the_protocol_method_list():
    """One executor entry per method of docs/protocol.md, and one conn.call function per row of its table."""
    assert tuple(api_module.METHODS) == protocol.METHODS
    assert tuple(api_module.CONN_FUNCTIONS) == protocol.CALL_FUNCTIONS


@pytest.mark.parametrize("method, params, role", [
    ("queue.pop", {"t": ["a"]}, "read"),
    ("queue.unpop", {}, "read"),
    ("conn.call", {"c": CLIENT, "f": "get_context"}, "read"),
    ("conn.call", {"c": CLIENT, "f": "subscribe", "a": ["x"]}, "write"),
    ("conn.call", {"c": CLIENT, "f": "set_context_value", "a": ["k", 1]}, "write"),
    ("conn.call", {"c": CLIENT, "f": "close"}, "write"),
    ("mesh.send", {"c": CLIENT, "d": "x"}, "write"),
    ("mesh.publish", {"c": "ch", "d": "x"}, "write"),
    ("channel.presence", {"c": "ch"}, "read"),
    ("channel.count", {"c": "ch"}, "read"),
    ("queue.ack", {"k": ["1"]}, "read"),
])
def test_roles_are_checked_in_the_executor(method, params, role):
    """A caller without the method's role gets 102 naming the role; with it, the call runs (docs/protocol.md roles)."""
    other = ({"read", "write"} - {role}).pop()
    code, envelope, parts = run(method, params, caller=WS._replace(roles=frozenset({other})))
    assert code == protocol.ErrorCode.NOT_AUTHORIZED
    assert envelope["E"]["c"] == 102 and role in envelope["E"]["m"] and envelope["i"] == 5
    assert parts.calls == []
    code, envelope, parts = run(method, params, caller=WS._replace(roles=frozenset({role})))
    assert code is None and envelope["E"] is None and parts.calls


# --- envelopes ------------------------------------------------------------------------------

def test_success_envelopes_over_ws_and_http():
    """Success is {"E": null, "r": ...}, with "i" over /ws/v1 and without it over HTTP."""
    code, envelope, parts = run("mesh.publish", {"c": ["a", "b"], "d": "hi"})
    assert code is None and envelope == {"E": None, "r": {"s": 2, "f": 1}, "i": 5}
    assert parts.calls == [("publish", ["a", "b"], protocol.encode_ws_frame(b"hi"))]
    code, envelope, _ = run("mesh.send", {"c": CLIENT, "d": "hi"}, caller=HTTP_CALLER)
    assert code is None and envelope == {"E": None, "r": {"s": True}}


def test_unknown_method_is_101():
    """A method the table does not have is 101 naming m, and nothing runs."""
    code, envelope, parts = run("mesh.nope", {})
    assert code == protocol.ErrorCode.INVALID_PARAMS and names_field(envelope["E"]["m"], "m")
    assert parts.calls == []


@pytest.mark.parametrize("caller, field", [(WS, "p.c"), (HTTP_CALLER, "c")])
def test_bad_params_name_the_field_in_the_callers_terms(caller, field):
    """101 names the field as the caller wrote it: p.c over /ws/v1, c in an HTTP body."""
    code, envelope, parts = run("mesh.send", {"c": "not-a-number", "d": "x"}, caller=caller)
    assert code == protocol.ErrorCode.INVALID_PARAMS and names_field(envelope["E"]["m"], field)
    assert parts.calls == []


def test_queue_methods_need_a_ws_connection():
    """queue.pop, queue.unpop and queue.ack without a consumer connection (HTTP) are 101."""
    for method, params in (("queue.pop", {"t": ["a"]}), ("queue.unpop", {"t": ["a"]}), ("queue.ack", {"k": []})):
        code, envelope, parts = run(method, params, caller=HTTP_CALLER)
        assert code == protocol.ErrorCode.INVALID_PARAMS and "/ws/v1" in envelope["E"]["m"]
        assert parts.calls == []


@pytest.mark.parametrize("error, expected", [
    (AlreadyConsuming("x"), protocol.ErrorCode.REPEATED_CONSUMPTION),
    (TooManyTopics("x"), protocol.ErrorCode.CONSUME_FAILED),
])
def test_queue_pop_refusals_keep_their_codes(error, expected):
    """A repeated topic is 202 and a topic limit 201, both naming p.t."""
    parts = Parts()
    parts.queues.consume = raiser(error)
    code, envelope, _ = run("queue.pop", {"t": ["a"]}, parts=parts)
    assert code == expected and names_field(envelope["E"]["m"], "p.t")


@pytest.mark.parametrize("field", ["window", "ack_timeout"])
def test_queue_pop_with_other_ack_settings_is_101_naming_the_field(field):
    """A connection's later at-least-once queue.pop asking for another window or ack_timeout is 101 naming it."""
    parts = Parts()
    parts.queues.consume = raiser(SettingsDiffer(field, "this connection consumes with another one already"))
    code, envelope, _ = run("queue.pop", {"t": ["a"], "ack": True, field: 5}, parts=parts)
    assert code == protocol.ErrorCode.INVALID_PARAMS and names_field(envelope["E"]["m"], f"p.{field}")


def test_queue_pop_and_ack_reach_the_queues():
    """queue.pop hands its options over; queue.ack answers how many ids were outstanding."""
    code, envelope, parts = run("queue.pop", {"t": ["a"], "ack": True, "window": 7})
    assert code is None and parts.calls == [("consume", 7, ["a"], protocol.AckOptions(7, None))]
    code, envelope, parts = run("queue.ack", {"k": ["x", "y"]})
    assert envelope["r"] == {"s": True, "n": 2} and parts.calls == [("ack", 7, ["x", "y"])]


def test_api_error_from_a_running_call_keeps_its_code():
    """An ApiError raised while a call runs (here a failed send) is answered with its own code and message."""
    parts = Parts()
    parts.forward.send = raiser(protocol.ApiError(protocol.ErrorCode.SEND_FAILED, "client 1 is not connected"))
    code, envelope, _ = run("mesh.send", {"c": "1", "d": "x"}, parts=parts)
    assert code == protocol.ErrorCode.SEND_FAILED
    assert envelope == {"E": {"c": 401, "m": "client 1 is not connected"}, "i": 5}


@pytest.mark.parametrize("method, params, break_it", [
    ("queue.pop", {"t": ["a"]}, lambda parts: setattr(parts.queues, "consume", raiser(RuntimeError("bug")))),
    ("queue.unpop", {}, lambda parts: setattr(parts.queues, "stop_consuming", raiser(KeyError("bug")))),
    ("mesh.send", {"c": CLIENT, "d": "x"}, lambda parts: setattr(parts.forward, "send", raiser(ValueError("bug")))),
    ("mesh.publish", {"c": "a", "d": "x"}, lambda parts: setattr(parts.forward, "publish", raiser(TypeError("bug")))),
    ("conn.call", {"c": CLIENT, "f": "get_context"},
     lambda parts: setattr(parts.forward, "call", async_raiser(RuntimeError("bug")))),
])
def test_unexpected_errors_are_logged_and_answered_501_for_every_method(method, params, break_it, caplog):
    """A bug in any method, sync or async, is logged with its traceback and answered 501 "internal error" once."""
    parts = Parts()
    break_it(parts)
    with caplog.at_level(logging.ERROR, logger="meshgate.access"):
        code, envelope, _ = run(method, params, parts=parts)
    assert code == protocol.ErrorCode.MESH_UNAVAILABLE
    assert envelope == {"E": {"c": 501, "m": "internal error"}, "i": 5}
    [record] = [r for r in caplog.records if r.name == "meshgate.access"]
    assert record.getMessage() == f"{method} failed" and record.exc_info is not None


def _deferred(outcome, finish):
    """A stand-in for what node/forward.py hands back while a peer answers: a Deferred settled on the next turn."""
    def start(*args):
        deferred = Deferred(finish)
        asyncio.get_running_loop().call_soon(deferred.set_result, outcome)
        return deferred
    return start


@pytest.mark.parametrize("method, params, attribute, finish, expected", [
    ("mesh.send", {"c": CLIENT, "d": "x"}, "send", lambda future: protocol.SENT, (None, {"s": True})),
    ("mesh.send", {"c": CLIENT, "d": "x"}, "send",
     raiser(protocol.ApiError(protocol.ErrorCode.SEND_FAILED, "client 1: its node 2 did not answer")), (401, None)),
    ("mesh.publish", {"c": "a", "d": "x"}, "publish", lambda future: (3, future.result()), (None, {"s": 3, "f": 4})),
    ("conn.call", {"c": CLIENT, "f": "get_context"}, "call", lambda future: {"s": True, "d": {}},
     (None, {"s": True, "d": {}})),
    ("conn.call", {"c": CLIENT, "f": "get_context"}, "call", raiser(KeyError("bug")), (501, None)),
])
def test_calls_that_wait_for_a_peer_are_settled_when_the_reply_comes(method, params, attribute, finish, expected):
    """A Deferred (no task): its finish gives the result, or the ApiError's code, or 501 for a bug; one reply."""
    parts = Parts()
    setattr(parts.forward, attribute, _deferred(4, finish))
    code, envelope, _ = run(method, params, parts=parts)
    assert (code, envelope.get("r")) == expected


def test_a_result_that_cannot_be_encoded_is_501_not_a_broken_reply(caplog):
    """A result holding something JSON (or UTF-8) cannot carry still gets exactly one envelope: 501."""
    parts = Parts()

    async def bad_result(*args):
        return {"s": True, "d": {"text": "\ud800"}}
    parts.forward.call = bad_result
    with caplog.at_level(logging.ERROR, logger="meshgate.access"):
        code, envelope, _ = run("conn.call", {"c": CLIENT, "f": "get_context"}, parts=parts)
    assert code == protocol.ErrorCode.MESH_UNAVAILABLE and envelope["i"] == 5


# --- conn.call on a local client --------------------------------------------------------------

class Conn:
    def __init__(self, context=None):
        self.client_id = 42
        self.context = context if context is not None else {}
        self.closed = None

    def close(self, code=1000, reason=""):
        self.closed = (code, reason)


def call_local(parts, function, args, client_id=42):
    return asyncio.run(Api(parts).call_local(client_id, function, args))


def test_call_local_unknown_client_is_301():
    """A client that is not on this node is 301."""
    with pytest.raises(protocol.ApiError) as error:
        call_local(Parts(), "get_context", [], client_id=1)
    assert error.value.code == protocol.ErrorCode.CALL_FAILED


@pytest.mark.parametrize("args, closed", [([], (1000, "")), ([4000], (4000, "")), ([4001, "bye"], (4001, "bye"))])
def test_call_local_close_passes_code_and_reason(args, closed):
    """close with [], [code] and [code, reason] closes the connection with those (1000 by default)."""
    parts = Parts()
    conn = parts.hub.conns[42] = Conn()
    assert call_local(parts, "close", args) == {"s": True}
    assert conn.closed == closed


@pytest.mark.parametrize("context", [{"bad": float("nan")}, {"bad": object()}, {"bad": "\ud800"}])
def test_get_context_of_a_context_json_cannot_carry_is_301(context):
    """get_context of a context holding NaN, an object or a lone surrogate is 301, not a broken reply."""
    parts = Parts()
    parts.hub.conns[42] = Conn(context)
    with pytest.raises(protocol.ApiError) as error:
        call_local(parts, "get_context", [])
    assert error.value.code == protocol.ErrorCode.CALL_FAILED and "not JSON" in error.value.message


def test_every_caller_has_every_role_until_users_are_configured():
    """The default roles are read and write (the API is open when no users are configured)."""
    assert WS.roles == HTTP_CALLER.roles == ALL_ROLES == frozenset({"read", "write"})


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_data_holding_nan_or_infinity_is_101_naming_d(number):
    """`d` with NaN or Infinity inside (accepted by the JSON reader) is 101 naming p.d, never 501."""
    params = json.loads('{"c": "ch", "d": {"x": %s}}' % number)
    code, envelope, parts = run("mesh.publish", params)
    assert code == protocol.ErrorCode.INVALID_PARAMS and names_field(envelope["E"]["m"], "p.d")
    assert parts.calls == []


def test_presence_and_count_replies():
    """channel.presence passes context and limit on; channel.count is the same answer without the list."""
    code, envelope, parts = run("channel.presence", {"c": "room", "context": True, "limit": 7})
    assert code is None and envelope["r"] == {"s": True, "count": 1, "clients": [{"c": CLIENT, "n": 1}]}
    assert parts.calls == [("presence", "room", True, 7)]
    code, envelope, parts = run("channel.count", {"c": "room"}, caller=HTTP_CALLER)
    assert code is None and envelope == {"E": None, "r": {"s": True, "count": 1}}
    assert parts.calls == [("presence", "room", False, 0)]



def test_a_call_cancelled_while_it_waits_is_still_answered_once():
    """The loop going away cancels a call that waits (a task): it is answered 501 once, and counted."""
    parts = Parts()
    replies = []

    async def never(*args):
        await asyncio.get_running_loop().create_future()
    parts.forward.call = never

    async def main():
        api = Api(parts)
        api.execute("conn.call", {"c": CLIENT, "f": "get_context"}, WS, 5, lambda code, body: replies.append((code, body)))
        await asyncio.sleep(0)
        [task] = api._tasks
        task.cancel()
        await asyncio.wait([task])
        return api.requests.counts
    counts = asyncio.run(main())
    assert [(code, json.loads(body)) for code, body in replies] == [
        (protocol.ErrorCode.MESH_UNAVAILABLE, {"E": {"c": 501, "m": "conn.call: cancelled"}, "i": 5})]
    assert counts == {("conn.call", "ws", "501"): 1}


@pytest.mark.parametrize("error, expected", [
    (protocol.ApiError(protocol.ErrorCode.INVALID_PARAMS, "request: malformed JSON", 9),
     {"E": {"c": 101, "m": "request: malformed JSON"}, "i": 9}),
    (RecursionError("a bug in a reader"), {"E": {"c": 501, "m": "internal error"}, "i": 9}),
])
def test_a_request_its_transport_cannot_read_is_answered_and_counted(error, expected, caplog):
    """What a parser raises: an ApiError keeps its code; anything else is logged and answered 501."""
    api = Api(Parts())
    with caplog.at_level(logging.ERROR, logger="meshgate.access"):
        code, envelope = api.unreadable(None, WS, error, 9)
    assert json.loads(envelope) == expected and int(code) == expected["E"]["c"]
    assert api.requests.counts == {("unknown", "ws", str(expected["E"]["c"])): 1}
    assert [r.exc_info is not None for r in caplog.records if r.name == "meshgate.access"] == (
        [] if isinstance(error, protocol.ApiError) else [True])
