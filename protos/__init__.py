"""The codexbroker.v1 wire contract: ``protos.broker_pb2`` (messages) and
``protos.broker_pb2_grpc`` (stubs and servicers), generated from ``broker.proto``.

Regenerate with ``python -m protos.generate`` after editing ``broker.proto``."""
