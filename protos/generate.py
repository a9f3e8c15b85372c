"""Regenerate the gRPC modules from protos/*.proto: ``python -m protos.generate``.

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
OUTPUTS = ["broker_pb2.py", "broker_pb2.pyi", "broker_pb2_grpc.py"]


def generate(out_root: Path) -> None:
    from grpc_tools import protoc  # dev dependency: pip install -e '.[dev]'

    (out_root / "protos").mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{ROOT}", f"--python_out={out_root}", f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}", *PROTOS]
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
