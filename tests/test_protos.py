"""The wire contract: generated modules match the .proto, and the contract's names exist."""
import subprocess
import sys
from pathlib import Path

from protos import broker_pb2

ROOT = Path(__file__).resolve().parent.parent


def test_generated_modules_are_not_stale():
    result = subprocess.run([sys.executable, "-m", "protos.generate", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_contract_names_are_the_documented_ones():
    file = broker_pb2.DESCRIPTOR
    assert file.package == "codexbroker.v1"
    app = file.services_by_name["AppServer"]
    assert {m.name for m in app.methods} == {"Session", "Call"}
    session = app.methods_by_name["Session"]
    assert session.client_streaming and session.server_streaming
    assert session.input_type.fields_by_name["message"].number == 1
    assert session.output_type.fields_by_name["messages"].is_repeated
    broker = file.services_by_name["Broker"]
    assert {m.name for m in broker.methods} == {"Status", "Drain"}
    reply = file.message_types_by_name["CallReply"]
    assert [f.name for f in reply.oneofs_by_name["outcome"].fields] == ["result_json", "error"]
    assert list(file.message_types_by_name["JsonRpcError"].fields_by_name) == ["code", "message", "data_json"]
    drain = file.message_types_by_name["DrainRequest"]
    assert list(drain.fields_by_name) == ["deadline_seconds", "reason", "force"]
    states = file.enum_types_by_name["BrokerState"].values_by_name
    assert list(states) == ["BROKER_STATE_UNSPECIFIED", "BROKER_STATE_STARTING", "BROKER_STATE_SERVING",
                            "BROKER_STATE_DRAINING", "BROKER_STATE_STOPPING"]


def test_a_stale_module_is_detected(tmp_path, monkeypatch):
    import protos.generate as gen

    fake_root = tmp_path / "repo"
    (fake_root / "protos").mkdir(parents=True)
    (fake_root / "protos" / "broker.proto").write_text((ROOT / "protos" / "broker.proto").read_text())
    for name in gen.OUTPUTS:
        (fake_root / "protos" / name).write_text((ROOT / "protos" / name).read_text())
    monkeypatch.setattr(gen, "ROOT", fake_root)
    assert gen.stale_outputs() == []
    proto = fake_root / "protos" / "broker.proto"
    text = proto.read_text().replace("message StatusRequest {}", "message StatusRequest { bool verbose = 1; }")
    proto.write_text(text)
    assert "broker_pb2.py" in gen.stale_outputs()
