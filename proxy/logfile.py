"""``serve --log-file``: the size-rotated log file that the process's stdout and stderr follow.

Its own module so that a broker logging to stderr never loads ``logging.handlers`` (and the
socket, pickle and queue machinery it brings) on its way to SERVING."""
from __future__ import annotations

import logging
import logging.handlers
import os
import sys


class LogFile(logging.handlers.RotatingFileHandler):
    """Size-rotated log file (one previous file kept, named by ``rotated_name``) that the
    process's stdout and stderr follow, so nothing written there escapes the rotation."""

    def __init__(self, path: str, max_bytes: int):
        super().__init__(path, maxBytes=max_bytes, backupCount=1, encoding="utf-8", errors="replace")
        self.namer = rotated_name
        self._follow()

    def shouldRollover(self, record: logging.LogRecord) -> bool:  # noqa: N802 (logging's name)
        """In bytes, counting what else was written to the file (the base class counts characters)."""
        if self.stream is None:
            self.stream = self._open()
        size = len((self.format(record) + "\n").encode("utf-8", "replace"))
        self.stream.seek(0, 2)
        return self.stream.tell() > 0 and self.stream.tell() + size > self.maxBytes

    def doRollover(self) -> None:  # noqa: N802 (logging's name)
        super().doRollover()
        self._follow()

    def _follow(self) -> None:
        if self.stream is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd in (1, 2):
                os.dup2(self.stream.fileno(), fd)


def rotated_name(default: str) -> str:
    """``broker-X.log.1`` -> ``broker-X.1.log`` (the log's pattern still matches it)."""
    base, _, number = default.rpartition(".")
    stem, dot, suffix = base.rpartition(".")
    return f"{stem}.{number}.{suffix}" if dot and "/" not in suffix else default
