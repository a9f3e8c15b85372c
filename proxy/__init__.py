"""The codex-broker proxy: one process that owns a `codex app-server` subprocess and serves it
to many local clients over gRPC (``codex-broker serve``)."""

__version__ = "0.1.0"
