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


_HEADERS = [_header(n) for n in range(1 << 14)]  # one or two varint bytes: nearly every message


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
