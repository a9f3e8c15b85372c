"""Pre-encoded ServerFrames parse as the protobuf ServerFrame with the same messages."""
from protos import broker_pb2
from proxy.frames import encode_frame


def test_encoded_frames_parse_as_server_frames_for_every_length_class():
    messages = [b"", b"{}", "é".encode() * 70, b"x" * 127, b"x" * 128, b"y" * 16383, b"z" * 16384,
                b"w" * (3 << 20), '{"delta":"日本語 ✓"}'.encode()]
    frame = broker_pb2.ServerFrame.FromString(encode_frame(messages))
    assert list(frame.messages) == [m.decode() for m in messages]
    assert encode_frame(messages) == broker_pb2.ServerFrame(messages=[m.decode() for m in messages]).SerializeToString()


def test_an_empty_batch_is_an_empty_frame():
    assert broker_pb2.ServerFrame.FromString(encode_frame([])).messages == []


def test_every_precomputed_length_prefix_is_the_varint_protobuf_writes():
    from proxy.frames import _HEADERS, _header

    assert len(_HEADERS) == 1 << 14
    assert _HEADERS == [_header(n) for n in range(1 << 14)]
    for n in (0, 1, 127, 128, 129, 255, 256, 1000, 8191, 8192, 16383):
        assert encode_frame([b"x" * n]) == broker_pb2.ServerFrame(messages=["x" * n]).SerializeToString()
