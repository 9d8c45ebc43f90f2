"""Property-based tests: the protocol parsers and the mesh readers return a value or raise their one error.

Whatever arrives (from a backend, a client, or another process of the
cluster), cluster/protocol.py raises only ApiError and cluster/mesh.py only
FrameError: never a TypeError, KeyError or anything else that would escape
into a handler. Inputs are random JSON values, random bytes, and well-formed
messages with random fields.
"""

import json
import math
import struct

from hypothesis import HealthCheck, given, settings, strategies as st

from cluster import mesh, protocol
from cluster.protocol import ApiError

SETTINGS = settings(max_examples=200, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

scalars = (st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30)
           | st.sampled_from(["", "\ud800", "a b", "x" * 300, "1463786910324359168", "text", "binary", "AAEC"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=8) | st.sampled_from(["c", "d", "t", "f", "a", "p"]),
                                             inner, max_size=5), max_leaves=25)
keyed = st.dictionaries(st.sampled_from(["c", "d", "t", "f", "a", "p", "i", "id", "m", "ch", "k", "o", "interest",
                                         "consumers", "s", "e", "ok", "r"]), json_values, max_size=6)
anything = json_values | keyed


def _only(error_type, call, *args):
    """Runs `call`: a value, or `error_type`; anything else fails the property."""
    try:
        return call(*args)
    except error_type:
        return None


def _dumps(value) -> str:
    return json.dumps(value, allow_nan=True)


# --- cluster/protocol.py ------------------------------------------------------------------------

@SETTINGS
@given(anything, st.sampled_from(["p.", ""]))
def test_parameter_parsers_raise_only_api_errors(params, prefix):
    """Every parse_* of method parameters returns or raises ApiError, whatever the parameters."""
    for parse in (protocol.parse_send, protocol.parse_publish, protocol.parse_conn_call, protocol.parse_queue_pop,
                  protocol.parse_queue_unpop, protocol.parse_queue_ack):
        _only(ApiError, parse, params, prefix)


@SETTINGS
@given(anything | st.text(max_size=60) | st.binary(max_size=60))
def test_request_decoders_raise_only_api_errors(value):
    """parse_ws_request and parse_http_body take any text or bytes and return or raise ApiError."""
    raw = value if isinstance(value, (str, bytes)) else _dumps(value)
    request = _only(ApiError, protocol.parse_ws_request, raw)
    if request is not None:
        assert request.method in protocol.METHODS
    _only(ApiError, protocol.parse_http_body, raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)


@SETTINGS
@given(keyed, st.sampled_from(protocol.METHODS), st.one_of(st.none(), st.integers(), st.text(max_size=10)))
def test_ws_requests_with_random_parameters(params, method, req_id):
    """A well-formed request with random parameters decodes, then its parameters parse or raise ApiError."""
    request = _only(ApiError, protocol.parse_ws_request, _dumps({"m": method, "p": params, "i": req_id}))
    if request is not None:
        assert request.req_id == req_id
        for parse in (protocol.parse_send, protocol.parse_publish, protocol.parse_conn_call):
            _only(ApiError, parse, request.params)


@SETTINGS
@given(json_values, st.text(max_size=8))
def test_names_ids_and_payloads(value, field):
    """parse_client_id, parse_name, parse_names and parse_payload return or raise ApiError naming the field."""
    for parse in (protocol.parse_client_id, protocol.parse_name, protocol.parse_names):
        try:
            parse(value, field)
        except ApiError as error:
            assert error.message.startswith(field)
    payload = _only(ApiError, protocol.parse_payload, {"d": value, "t": "text"})
    if payload is not None:
        payload.data.decode("utf-8")   # what reaches a client is UTF-8 text


@SETTINGS
@given(st.text(max_size=20) | st.sampled_from(protocol.CALL_FUNCTIONS), st.lists(json_values, max_size=4))
def test_conn_call_arguments(function, args):
    """parse_call_args returns or raises ApiError for any function name and arguments."""
    _only(ApiError, protocol.parse_call_args, function, args)


# --- cluster/mesh.py ----------------------------------------------------------------------------

@SETTINGS
@given(st.lists(st.binary(max_size=80), max_size=3))
def test_mesh_readers_take_any_frames(frames):
    """read_request, read_reply and read_control take any frames and return or raise FrameError."""
    _only(mesh.FrameError, mesh.read_request, frames)
    _only(mesh.FrameError, mesh.read_reply, frames)
    for allowed in (mesh.FROM_NODE, mesh.FROM_COORDINATOR, mesh.FROM_SUPERVISOR):
        _only(mesh.FrameError, mesh.read_control, frames, allowed)


REQUEST_CODES = st.integers(min_value=0, max_value=8)
BODIES = st.binary(max_size=40) | st.sampled_from([protocol.encode_ws_frame(b"ok"),
                                                  protocol.encode_ws_frame(b"\xff", binary=True),
                                                  protocol.queue_event(1, 2, "t", {"frame": {}})])


@SETTINGS
@given(REQUEST_CODES, st.integers(min_value=0, max_value=2 ** 64 - 1), keyed | json_values, BODIES)
def test_mesh_requests_with_random_headers(code, request_id, header, body):
    """A well-framed request of any kind code with a random header and body reads or raises FrameError."""
    head = _dumps(header).encode("utf-8", "surrogatepass")
    frame = struct.pack("!BQI", code, request_id, len(head)) + head + body
    request = _only(mesh.FrameError, mesh.read_request, [frame])
    if request is not None:
        assert request.request_id == request_id and type(request.message) in mesh._REQUESTS


CONTROL_KINDS = st.sampled_from([b"REG", b"HB", b"ADV", b"SYNC", b"BYE", b"WELCOME", b"UPD", b"SNAP", b"REREG",
                                 b"REFUSED", b"EXIT", b"NOPE"])
control_bodies = st.fixed_dictionaries({}, optional={
    key: json_values for key in ("node_id", "host", "pid", "api_server", "mesh_point", "started_at", "state",
                                 "stats", "interest", "consumers", "opened", "closed", "v", "nodes", "dead",
                                 "snapshot", "not_before_ms", "reason", "retry", "lease", "clients",
                                 "exited_at", "code")})


@SETTINGS
@given(CONTROL_KINDS, control_bodies | anything)
def test_control_messages_with_random_fields(kind, body):
    """A control message of any kind with random fields reads (every direction tried) or raises FrameError."""
    frames = [kind, _dumps(body).encode("utf-8", "surrogatepass")]
    for allowed in (mesh.FROM_NODE, mesh.FROM_COORDINATOR, mesh.FROM_SUPERVISOR):
        message = _only(mesh.FrameError, mesh.read_control, frames, allowed)
        if message is not None:
            mesh.encode_control(message)   # what was read can be sent on


@SETTINGS
@given(st.sampled_from(list(mesh._REQUESTS)), keyed | json_values | st.binary(max_size=30))
def test_results_of_every_kind(kind, result):
    """read_result of any kind takes any bytes and returns its value or a Failure, or raises FrameError."""
    raw = result if isinstance(result, bytes) else _dumps(result).encode("utf-8", "surrogatepass")
    value = _only(mesh.FrameError, mesh.read_result, kind, raw)
    if isinstance(value, mesh.Failure):
        assert isinstance(value.message, str) and len(value.message) <= 1000
    elif isinstance(value, mesh.Delivered):
        assert value.written >= 0 and value.failed >= 0 and not math.isnan(value.written)
