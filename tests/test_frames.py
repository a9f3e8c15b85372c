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
