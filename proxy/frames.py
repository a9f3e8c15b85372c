"""ServerFrame encoding without building protobuf objects.

``ServerFrame { repeated string messages = 1; }`` is, on the wire, each message as field 1:
the tag byte 0x0A, the length as a varint, the UTF-8 bytes. The broker already holds every
message as UTF-8 bytes (app-server lines pass through untouched), so encoding a frame is one
join: no decode to str, no protobuf message, no second serialization. The Session handler is
registered with no response serializer and writes these bytes as they are; clients parse them
as ordinary ServerFrames. ``tests/test_frames.py`` checks the equivalence."""
from __future__ import annotations

from collections.abc import Sequence

_TAG = 0x0A  # field 1, wire type 2 (length-delimited)


def _header(length: int) -> bytes:
    out = bytearray((_TAG,))
    while length >= 0x80:
        out.append((length & 0x7F) | 0x80)
        length >>= 7
    out.append(length)
    return bytes(out)


def _headers() -> list[bytes]:
    """``_header(n)`` for every n below 2**14 (one or two varint bytes: nearly every message),
    built from 128 low and 128 high bytes: a loop per header would cost milliseconds of the
    broker's start."""
    lows = [bytes((_TAG, low | 0x80)) for low in range(0x80)]
    highs = [bytes((high,)) for high in range(1, 0x80)]
    return [bytes((_TAG, n)) for n in range(0x80)] + [low + high for high in highs for low in lows]


_HEADERS = _headers()


def encode_frame(messages: Sequence[bytes]) -> bytes:
    if not messages:
        return b""
    sizes = list(map(len, messages))
    if max(sizes) < len(_HEADERS):  # nearly always: headers looked up and interleaved in C
        parts: list[bytes] = [b""] * (2 * len(sizes))
        parts[::2] = map(_HEADERS.__getitem__, sizes)
        parts[1::2] = messages
        return b"".join(parts)
    parts = []
    append = parts.append
    headers = _HEADERS
    for message, size in zip(messages, sizes, strict=True):
        append(headers[size] if size < 16384 else _header(size))
        append(message)
    return b"".join(parts)


# -- requests, read by hand ------------------------------------------------------------------
# protobuf checks that a string field is UTF-8 before any handler runs, and a request it cannot
# parse never reaches the handler: a client not written in Python can send a ClientFrame whose
# message is not UTF-8, and the Session would end without a JSON-RPC answer. So the service
# reads its requests here, taking the string fields as bytes; the hub judges the bytes.
class FrameError(ValueError):
    """Bytes that are not a protobuf message of the expected shape."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise FrameError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def read_fields(data: bytes) -> dict[int, bytes]:
    """The length-delimited fields of a protobuf message, by number, as bytes (the last one of a
    field wins, as protobuf reads a singular field); fields of other wire types are skipped."""
    fields: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise FrameError("field number 0")
        if wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise FrameError("a field runs past the end of the message")
            fields[number] = data[pos:pos + length]
            pos += length
        elif wire == 0:
            _, pos = _varint(data, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise FrameError(f"unsupported wire type {wire}")
    if pos > end:
        raise FrameError("a field runs past the end of the message")
    return fields


def client_message(data: bytes) -> bytes | FrameError:
    """``ClientFrame.message`` as bytes, or why the frame cannot be read (never raises: it runs
    as gRPC's request deserializer, where an exception would end the Session without a word).
    The fast path relies on the usual frame being field 1 alone."""
    try:
        if data[:1] == b"\x0a":
            length, pos = _varint(data, 1)
            if pos + length == len(data):
                return data[pos:]
        return read_fields(data).get(1, b"")
    except FrameError as exc:
        return exc
