"""The pure rules of client servers: which frame headers and close frames break RFC 6455, and the rate bucket."""

import struct
import types

import pytest

from node.client_limits import take_token
from node.client_protocol import close_frame_problem, frame_problem

MASKED = 0x80


@pytest.mark.parametrize("first, second, in_message, problem", [
    (0x81, MASKED | 5, False, None),                 # a whole text frame
    (0x02, MASKED | 5, False, None),                 # the first fragment of a binary message
    (0x00, MASKED | 5, True, None),                  # a continuation
    (0x89, MASKED | 125, True, None),                # a ping between fragments
    (0x88, MASKED | 2, False, None),                 # a close
    (0xC1, MASKED | 5, False, "reserved bits set"),
    (0xA1, MASKED | 5, False, "reserved bits set"),
    (0x83, MASKED | 5, False, "unknown opcode 0x3"),
    (0x8F, MASKED, False, "unknown opcode 0xf"),
    (0x81, 5, False, "unmasked client frame"),
    (0x09, MASKED, False, "fragmented control frame"),
    (0x89, MASKED | 126, False, "control frame over 125 bytes"),
    (0x80, MASKED | 1, False, "continuation frame without a message"),
    (0x81, MASKED | 1, True, "new message before the fragmented one ended"),
])
def test_frame_problem(first, second, in_message, problem):
    """Each header byte pair is read as RFC 6455 section 5.2 says a client frame must be."""
    assert frame_problem(first, second, in_message) == problem


@pytest.mark.parametrize("payload, problem", [
    (b"", None),
    (struct.pack("!H", 1000), None),
    (struct.pack("!H", 4999) + "bye €".encode(), None),
    (b"\x03", (1002, "close frame of one byte")),
    (struct.pack("!H", 1005), (1002, "close code 1005 not allowed")),
    (struct.pack("!H", 2000), (1002, "close code 2000 not allowed")),
    (struct.pack("!H", 1000) + b"\xff", (1007, "close reason not UTF-8")),
])
def test_close_frame_problem(payload, problem):
    """A client's close frame: no payload or a valid code with a UTF-8 reason; else 1002 or 1007."""
    assert close_frame_problem(payload) == problem


def test_token_bucket_starts_full_refills_at_rate_and_holds_at_most_burst():
    """rate 2/s, burst 3: three at once, then one per half second; a long pause refills to 3, not more."""
    limit = types.SimpleNamespace(rate=2.0, burst=3)
    conn = types.SimpleNamespace(bucket_tokens=None, bucket_time=0.0)
    assert [take_token(conn, limit, 10.0) for _ in range(4)] == [True, True, True, False]
    assert take_token(conn, limit, 10.5) is True and take_token(conn, limit, 10.5) is False
    assert [take_token(conn, limit, 100.0) for _ in range(4)] == [True, True, True, False]
