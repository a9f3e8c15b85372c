"""Text that protobuf can carry: a ``string`` field must be valid UTF-8.

Paths reach the broker as the OS gives them: a workspace whose name is not valid UTF-8 is a
``str`` holding surrogate escapes (PEP 383), and a JSON ``"\\ud800"`` decodes to a lone
surrogate. Either one makes protobuf raise while it serializes, which turned a Status into an
RPC error. :func:`proto_text` is the one door such text goes through on its way to the wire.
Fast path: text that already encodes (all of it, in practice) is returned unchanged after one
``encode``; only text with surrogates is rewritten.
"""
from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # one undecodable byte of an OS path (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"  # a lone surrogate, e.g. from a JSON escape


def proto_text(value: str) -> str:
    """``value`` as valid UTF-8 text: unchanged when it is; otherwise each undecodable byte of
    a path reads ``\\xNN`` and each lone surrogate ``\\uNNNN`` (for people: not reversible)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub(_escape, value)
    return value


def proto_texts(values: list[str] | tuple[str, ...]) -> list[str]:
    return [proto_text(v) for v in values]
