"""The app-server's stdout as lines: however the pipe cuts the bytes into chunks, the lines
handed on are the same, in order (blank ones aside), each line over the limit is reported
once with its length and never handed on, and the lines a chunk finishes go on together,
joined by newlines as they came. No processes here: chunks are fed by hand."""
from __future__ import annotations

import random

import pytest

from proxy.appserver import LineSplitter

LIMIT = 64


def split(chunks: list[bytes], limit: int = LIMIT) -> tuple[list[bytes], list[int], list[bytes]]:
    bodies: list[bytes] = []
    oversized: list[int] = []
    splitter = LineSplitter(bodies.append, oversized.append, limit)
    for chunk in chunks:
        splitter.feed(chunk)
    assert all(isinstance(body, bytes) and body.strip() for body in bodies)
    lines = [line for body in bodies for line in body.split(b"\n") if line.strip()]
    return lines, oversized, bodies


def expected(stream: bytes, limit: int = LIMIT) -> tuple[list[bytes], list[int]]:
    """What any chunking must give: the stream's complete lines, blank ones skipped, the long
    ones reported by length."""
    *complete, _ = stream.split(b"\n")
    return ([line for line in complete if line.strip() and len(line) <= limit],
            [len(line) for line in complete if len(line) > limit])


def cuts(stream: bytes, rng: random.Random) -> list[bytes]:
    chunks, at = [], 0
    while at < len(stream):
        step = rng.choice((1, 2, 7, 30, 64, 65, 100, 300))
        chunks.append(stream[at:at + step])
        at += step
    return chunks


STREAMS = {
    "one line": b'{"id":1,"result":{}}\n',
    "many lines": b"".join(b'{"method":"d","params":{"n":%d}}\n' % n for n in range(40)),
    "blank and whitespace lines": b'{"a":1}\n\n   \n\t\r\n{"b":2}\n\n',
    "a line at the limit": b"x" * LIMIT + b"\n" + b'{"c":3}\n',
    "a line one over the limit": b"y" * (LIMIT + 1) + b"\n" + b'{"c":3}\n',
    "a huge line between small ones": b'{"a":1}\n' + b"z" * 1000 + b"\n" + b'{"b":2}\n',
    "two long lines in a row": b"p" * 200 + b"\n" + b"q" * 70 + b"\n" + b'{"e":5}\n',
    "a partial last line": b'{"a":1}\n{"b":2}\n{"unfinished":',
}


@pytest.mark.parametrize("name", list(STREAMS))
def test_any_chunking_hands_on_the_same_lines(name: str) -> None:
    stream = STREAMS[name]
    want = expected(stream)
    assert split([stream])[:2] == want
    assert split([bytes([b]) for b in stream])[:2] == want
    rng = random.Random(name)
    for _ in range(200):
        assert split(cuts(stream, rng))[:2] == want


def test_the_lines_a_chunk_finishes_go_on_together_as_they_came() -> None:
    """Its first line (which may end a line begun in the chunk before) is not handed on apart
    from the rest, and the bytes between them are the stream's own."""
    _, _, bodies = split([b'{"a":', b'1}\n{"b":2}\n\n{"c":3}\r\n{"d":'])
    assert bodies == [b'{"a":1}\n{"b":2}\n\n{"c":3}\r']
    _, _, bodies = split([b'{"a":1}\n{"b":2}\n'])
    assert bodies == [b'{"a":1}\n{"b":2}']
    _, _, bodies = split([b"\n \n", b"\t\n"])  # only blank lines: nothing to hand on
    assert bodies == []


def test_a_chunk_bigger_than_the_limit_checks_each_line() -> None:
    lines, oversized, _ = split([b'{"a":1}\n' + b"w" * 100 + b"\n" + b'{"b":2}\n'], limit=64)
    assert lines == [b'{"a":1}', b'{"b":2}']
    assert oversized == [100]


def test_a_line_that_never_ends_is_dropped_as_it_arrives() -> None:
    bodies: list[bytes] = []
    oversized: list[int] = []
    splitter = LineSplitter(bodies.append, oversized.append, LIMIT)
    for _ in range(1000):
        splitter.feed(b"r" * 50)
    assert len(splitter._buf) <= LIMIT  # nothing of it kept beyond the limit
    splitter.feed(b'r\n{"after":1}\n')
    assert oversized == [50 * 1000 + 1]
    assert bodies == [b'{"after":1}']
