"""The contract module: the serve argv spawn builds is the one gc and identity parse back, and
nothing else parses as one; the endpoint grammar normalizes paths; one CODEX_HOME rule for
`serve` and the lifecycle; nothing heavy is imported."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy import contract
from proxy.config import ConfigError, ServeConfig, parse_endpoint


def spawned_argv(**changes: str) -> list[str]:
    values = dict(endpoint="unix:/tmp/rt/0123abcd/s.sock", cwd="/work space", app_server="python fake.py --x=1",
                  instance_id="inst-1", pid_file="/tmp/rt/0123abcd/broker.pid", state_root="/home/u/.state",
                  log_file="/home/u/.state/logs/broker-1.log")
    values.update(changes)
    return contract.build_serve_argv("/venv/bin/python3.11", max_age_hours=0.0005, **values)


def test_the_argv_spawn_builds_parses_back_to_what_it_says() -> None:
    parsed = contract.parse_serve_argv(spawned_argv())
    assert parsed == contract.ServeArgv(endpoint="unix:/tmp/rt/0123abcd/s.sock", cwd="/work space",
                                        app_server="python fake.py --x=1", instance_id="inst-1",
                                        pid_file="/tmp/rt/0123abcd/broker.pid", state_root="/home/u/.state",
                                        token_file=None, max_age_hours=0.0005)


def test_the_console_script_and_module_forms_parse() -> None:
    options = ["serve", "--endpoint", "unix:/a/s.sock", "--instance-id", "i"]
    for argv in (["/v/bin/codex-broker", *options], ["/v/bin/python", "/v/bin/codex-broker", *options],
                 ["python3", "-m", "proxy", *options]):
        parsed = contract.parse_serve_argv(argv)
        assert parsed is not None and parsed.instance_id == "i", argv


@pytest.mark.parametrize("argv", [
    ["python", "-c", "import time", "serve", "--endpoint", "unix:/a/s.sock"],
    ["sh", "-c", "sleep 1", "serve", "--endpoint", "unix:/a/s.sock"],
    ["sleep", "serve", "--endpoint", "unix:/a/s.sock"],
    ["python", "-m", "other", "serve", "--endpoint", "unix:/a/s.sock"],
    ["python", "-m", "proxy", "serve"],
    ["python", "-m", "proxy", "serve", "--endpoint", "unix:/a/s.sock", "--unknown"],
    ["python", "-m", "proxy", "serve", "--endp", "unix:/a/s.sock"],
    ["python", "-m", "proxy", "serve", "--endpoint", "unix:/a/s.sock", "--endpoint", "unix:/b/s.sock"],
    ["python", "-m", "proxy", "serve", "--endpoint", "unix:/a/s.sock", "--instance-id=a", "--instance-id", "b"],
    ["python", "-m", "proxy", "serve", "--endpoint", "unix:/a/s.sock", "extra"],
    [],
], ids=["python-c", "sh-c", "sleep", "other-module", "no-endpoint", "unknown-option", "abbreviated",
        "endpoint-twice", "instance-twice", "positional", "empty"])
def test_anything_but_an_exact_serve_argv_is_not_one(argv: list[str]) -> None:
    assert contract.parse_serve_argv(argv) is None


def test_unix_endpoints_are_normalized_and_bounded() -> None:
    assert contract.parse_unix_endpoint("unix:/tmp/rt/../elsewhere/s.sock") == "/tmp/elsewhere/s.sock"
    assert contract.parse_unix_endpoint("unix:///tmp/rt/./x/s.sock") == "/tmp/rt/x/s.sock"
    with pytest.raises(contract.EndpointError, match="too long"):
        contract.parse_unix_endpoint("unix:/" + "x" * 200)
    with pytest.raises(ConfigError, match="expected unix:PATH or tcp:HOST:PORT"):
        parse_endpoint("http://x")
    assert contract.parse_tcp_endpoint("tcp:[::1]:0") == ("[::1]", 0)


def test_session_dir_names_are_the_ones_spawn_gives() -> None:
    assert contract.is_session_dir_name("0123abcd")
    for name in ("0123abc", "0123abcde", "0123ABCD", "../12345", "s.sock"):
        assert not contract.is_session_dir_name(name)


def test_serve_and_the_lifecycle_resolve_codex_home_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lifecycle.decide import resolve_codex_home

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CODEX_HOME", "~/codex-home")
    config = ServeConfig(endpoint="unix:/tmp/x/s.sock", app_server=["true"])
    assert config.codex_home == resolve_codex_home({"HOME": str(tmp_path), "CODEX_HOME": "~/codex-home"})
    assert config.codex_home == str(tmp_path / "codex-home")


def test_the_contract_imports_neither_grpc_nor_protobuf_nor_asyncio() -> None:
    code = ("import sys, proxy.contract, proxy.config, proxy.cli; "
            "print([m for m in ('grpc', 'google.protobuf', 'asyncio') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
