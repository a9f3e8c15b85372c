"""Regenerate the gRPC modules from protos/*.proto: ``python -m protos.generate``.

The typed stub of the gRPC module (``broker_pb2_grpc.pyi``, from mypy-protobuf) lets mypy
check the servicers and stubs at the gRPC boundary.

With ``--check`` it regenerates into a temporary directory and exits 1 when the committed
modules differ (the test suite runs this)."""
from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ["protos/broker.proto"]
OUTPUTS = ["broker_pb2.py", "broker_pb2.pyi", "broker_pb2_grpc.py", "broker_pb2_grpc.pyi"]


def _plugin(name: str) -> str:
    """A protoc plugin installed beside this interpreter (mypy-protobuf, a dev dependency)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: pip install -e '.[dev]' (it comes with mypy-protobuf)")
    return found


def generate(out_root: Path) -> None:
    from grpc_tools import protoc  # dev dependency: pip install -e '.[dev]'

    (out_root / "protos").mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{ROOT}", f"--python_out={out_root}", f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}", f"--mypy_grpc_out={out_root}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}", *PROTOS]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def stale_outputs() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [name for name in OUTPUTS
                if not (ROOT / "protos" / name).exists()
                or not filecmp.cmp(Path(tmp) / "protos" / name, ROOT / "protos" / name, shallow=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed modules are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_outputs()
        if stale:
            print(f"stale generated modules: {', '.join(stale)}; run: python -m protos.generate", file=sys.stderr)
            return 1
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for name in OUTPUTS:
            shutil.copyfile(Path(tmp) / "protos" / name, ROOT / "protos" / name)
    print(f"generated {', '.join('protos/' + n for n in OUTPUTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
