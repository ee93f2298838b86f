"""Output whose reader may leave: `command | head -1` closes the pipe after one line, a closed ssh session hangs up
the terminal. The next print or log line would then fail (BrokenPipeError, EIO) and end the command with a traceback,
or print "--- Logging error ---" for every line; the command's results, all files, must not depend on it."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys


def reader_gone(e: BaseException) -> bool:
    """The write failed because nobody reads any more: a closed pipe (`| head -1`) or a hung-up terminal."""
    return isinstance(e, OSError) and e.errno in (errno.EPIPE, errno.EIO)


class ToleratesClosedReader:
    """A stand-in for sys.stdout or sys.stderr. Once a write finds that the reader is gone, the rest of the output goes
    to /dev/null, so that the command finishes its work (its results are files, written before they are printed)
    instead of dying on the next print or log line."""

    def __init__(self, stream):
        self.stream = stream

    def _gone(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())  # the same descriptor, now a sink: the buffered text drains there
        os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as e:
            if not reader_gone(e):
                raise
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            if not reader_gone(e):
                raise
            self._gone()
            self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def readers_may_leave():
    """sys.stdout and sys.stderr, and the log handlers that write to them, tolerate a reader that leaves early."""
    saved = sys.stdout, sys.stderr
    handlers = [h for name in [None, *logging.root.manager.loggerDict] for h in logging.getLogger(name).handlers
                if type(h) is logging.StreamHandler and h.stream in saved]
    sys.stdout, sys.stderr = (s if isinstance(s, ToleratesClosedReader) or not hasattr(s, "fileno")
                              else ToleratesClosedReader(s) for s in saved)
    streams = {id(old): new for old, new in zip(saved, (sys.stdout, sys.stderr))}
    previous = [(h, h.stream) for h in handlers]
    for h in handlers:
        h.setStream(streams[id(h.stream)])
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()  # now, while a closed pipe is still tolerated, not at exit (status 120)
        for h, stream in previous:
            h.setStream(stream)
        sys.stdout, sys.stderr = saved
