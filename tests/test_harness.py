"""The harness's Session client is transport-neutral: the same client, over JSON lines on a
child's pipes (the fake app-server spoken to directly), does requests, notifications and the
end of the stream as it does over a gRPC Session."""
from __future__ import annotations

import asyncio
import sys

from harness import FAKE, LinesSession, notifications, run


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
