"""SIGINT and SIGTERM end the ``vitedge`` command cleanly: exit 130 / 143, no traceback, no staging folder left.

The handler raises ``Interrupted``, a SystemExit: it unwinds through every ``finally`` and
``except BaseException`` (``staged_outdir`` drops its staging folder, locks are released)
but no ``except Exception`` swallows it, and when it escapes a module import at start-up
Python exits with its code without printing a traceback. Later signals are ignored so that
the clean-up itself is not interrupted. This module imports nothing heavy: the package
installs it before torch and onnx load, and only when the process is the ``vitedge``
command (a library user's or pytest's own handling of Ctrl-C is left alone).
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(SystemExit):
    """The command was stopped by a signal; ``code`` is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(EXIT_CODES.get(signum, 128 + signum))
        self.signum = signum


def _handle(signum, frame):
    for other in EXIT_CODES:
        signal.signal(other, signal.SIG_IGN)
    try:
        os.write(2, f"\nvitedge: interrupted by {signal.Signals(signum).name}; nothing half-written is kept\n".encode())
    except OSError:
        pass
    raise Interrupted(signum)


def install() -> None:
    """Route SIGINT and SIGTERM to ``Interrupted`` (main thread only; a no-op elsewhere)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for signum in EXIT_CODES:
        signal.signal(signum, _handle)


def running_as_command() -> bool:
    """True in the ``vitedge`` console script and under ``python -m vitedge[.cli]``."""
    argv = getattr(sys, "orig_argv", sys.argv)
    if os.path.basename(sys.argv[0] if sys.argv else "") in ("vitedge", "vitedge.exe"):
        return True
    return any(arg == "-m" and nxt in ("vitedge", "vitedge.cli", "vitedge.__main__") for arg, nxt in zip(argv, argv[1:]))
