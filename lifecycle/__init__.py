"""Lifecycle client of codex-broker: state, identity, the ensure decision and the CLI."""
