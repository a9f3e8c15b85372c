"""codex-broker benchmark: the broker next to direct stdio to the same fake app-server, every
figure next to its DESIGN.md section 7 target. Run ``python -m bench`` (see ``bench/__main__.py``)."""
