"""The harness's Session client is transport-neutral: the same client, over JSON lines on a
child's pipes (the fake app-server spoken to directly), does requests, notifications and the
end of the stream as it does over a gRPC Session. The JSONL socket's client holds the other side
to its framing: a blank line, a line that is not a JSON object or a last line cut short fails it."""
from __future__ import annotations

import asyncio
import os
import shutil
import sys

import pytest
from harness import FAKE, JsonlSession, LinesSession, notifications, run, short_dir


async def spawn_fake() -> tuple[asyncio.subprocess.Process, LinesSession]:
    proc = await asyncio.create_subprocess_exec(sys.executable, str(FAKE), stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    return proc, LinesSession(proc.stdout, proc.stdin)


def test_lines_session_does_requests_notifications_and_sees_the_end_of_the_stream():
    async def main() -> None:
        proc, s = await spawn_fake()
        try:
            assert "result" in await s.initialize()
            echoed = await s.result("fake/echo", {"n": 12345678901234567890})
            assert echoed == {"params": {"n": 12345678901234567890}}
            await s.result("fake/notify", {"count": 3})
            ticks = await s.until(lambda m: m.get("method") == "fake/tick" and m["params"]["i"] == 2)
            assert [m["params"]["i"] for m in notifications(ticks, "fake/tick")] == [0, 1, 2]
            reply = await s.response(await s.send_request("no/such/method", {}, id="x-1"))
            assert reply["id"] == "x-1" and "error" in reply
            await s.done_writing()  # EOF: the fake exits, the stream ends
            assert await s.wait_end() is None and s.ended
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        finally:
            await s.close()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    run(main())


async def serve_bytes(payload: bytes) -> tuple[asyncio.Server, str]:
    """A unix socket that writes ``payload`` to each connection, then closes it."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        writer.close()

    path = os.path.join(short_dir(), "j.sock")
    return await asyncio.start_unix_server(handle, path), path


def test_jsonl_session_keeps_each_line_and_says_closed_when_the_other_side_closes():
    async def main() -> None:
        server, path = await serve_bytes(b'{"id": 1, "result": {}}\n{"method": "m"}\n')
        async with server:
            async with await JsonlSession.connect(path) as c:
                assert await c.wait_end() == "closed"
                assert c.lines == [b'{"id": 1, "result": {}}', b'{"method": "m"}']
                assert c.messages == [{"id": 1, "result": {}}, {"method": "m"}]
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)

    run(main())


@pytest.mark.parametrize("payload, error", [
    (b'{"id": 1, "result": {}}\n\n', ValueError),  # a blank line
    (b"[1, 2]\n", AssertionError),  # JSON, not an object
    (b'{"id": 1, "result": {}}', AssertionError),  # the last line without its newline
])
def test_jsonl_session_fails_on_a_line_that_breaks_the_framing(payload, error):
    async def main() -> None:
        server, path = await serve_bytes(payload)
        async with server:
            c = await JsonlSession.connect(path)
            await c.wait_end()
            with pytest.raises(error):
                await c.close()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)

    run(main())
