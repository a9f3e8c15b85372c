"""A worked codex-broker Session in Python with grpcio (see docs/CLIENTS.md): initialize, start a
thread, run one turn, print every message (one JSON line each), half-close once the turn has
completed, and exit 0 when the Session ends OK.

    python session.py ENDPOINT PROMPT

ENDPOINT: unix:/path/to/s.sock, or tcp:HOST:PORT with the token in $CODEX_BROKER_TOKEN. Uses the
generated stubs in protos/ (``pip install codex-broker`` brings them, or run from a checkout)."""
from __future__ import annotations

import itertools
import json
import os
import queue
import sys

import grpc

from protos import broker_pb2, broker_pb2_grpc

# The limits every client must set: results of many MB arrive as one message (the default 4 MiB
# receive limit would end the Session with RESOURCE_EXHAUSTED); the broker accepts 64 MiB.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", 64 << 20)]
END = None


def main(endpoint: str, prompt: str) -> int:
    target = endpoint.removeprefix("tcp:")  # grpc takes unix:/absolute/path as it is
    token = os.environ.get("CODEX_BROKER_TOKEN")
    metadata = [("authorization", f"Bearer {token}")] if token else []
    outgoing: queue.Queue[str | None] = queue.Queue()
    ids = itertools.count(1)

    def send(msg: dict) -> None:
        outgoing.put(json.dumps(msg))

    def frames():  # the request stream: one ClientFrame per message; END half-closes
        while (text := outgoing.get()) is not END:
            yield broker_pb2.ClientFrame(message=text)

    def request(method: str, params: dict) -> int:
        req_id = next(ids)
        send({"id": req_id, "method": method, "params": params})
        return req_id

    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        replies = broker_pb2_grpc.AppServerStub(channel).Session(frames(), metadata=metadata)
        waiting = {request("initialize", {"clientInfo": {"name": "python-example", "version": "1"}}): "initialize"}
        thread_id = None
        try:
            for frame in replies:  # one ServerFrame: one or more messages, in the app-server's order
                for text in frame.messages:
                    print(text, flush=True)
                    msg = json.loads(text)
                    if "method" in msg and "id" in msg:  # a server request (an approval): declined here
                        send({"id": msg["id"], "error": {"code": -32000, "message": "declined by the example"}})
                    elif waiting.get(msg.get("id")) == "initialize":
                        send({"method": "initialized"})
                        waiting = {request("thread/start", {"cwd": os.getcwd()}): "thread/start"}
                    elif waiting.get(msg.get("id")) == "thread/start":
                        thread_id = msg["result"]["thread"]["id"]
                        waiting = {request("turn/start", {"threadId": thread_id,
                                                          "input": [{"type": "text", "text": prompt}]}): "turn/start"}
                    elif msg.get("method") == "turn/completed" and msg["params"]["threadId"] == thread_id:
                        outgoing.put(END)  # half-close: the broker ends the Session once our work is done
        except grpc.RpcError as exc:
            print(f"session ended: {exc.code().name} {exc.details()}", file=sys.stderr)
            outgoing.put(END)
            return 1
    print("session ended: OK", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
