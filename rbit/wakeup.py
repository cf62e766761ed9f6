"""What the worker waits on: one selector over the broker's socket, the jobs' pipes and a wake-up pipe.

Signal handlers and other threads only write a byte to the wake-up pipe, so
that the single-threaded loop notices them at once.
"""

from __future__ import annotations

import os
import selectors
import signal
import threading
from typing import Callable

#: The selector's tag of the wake-up pipe.
WAKE = "wake"


class Wakeup:
    """A selector whose registrations are named by tags, with a pipe that wakes it."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self.selector.register(self._read, selectors.EVENT_READ, WAKE)

    def wait(self, timeout: float) -> list:
        """The tags that are ready within *timeout* seconds (the wake-up pipe is emptied)."""
        tags = [key.data for key, _ in self.selector.select(timeout)]
        if WAKE in tags:
            try:
                while os.read(self._read, 512):
                    pass
            except BlockingIOError:
                pass
        return tags

    def wake(self) -> None:
        """Make the current or next :meth:`wait` return at once (safe from signals and threads)."""
        try:
            os.write(self._write, b"!")
        except OSError:  # the pipe is full (it will wake anyway) or closed
            pass

    def watch(self, fd: int, tag) -> None:
        self.unwatch(tag)
        self.selector.register(fd, selectors.EVENT_READ, tag)

    def unwatch(self, tag) -> None:
        for fd, key in list(self.selector.get_map().items()):
            if key.data == tag:
                self.selector.unregister(fd)

    def on_signals(self, handler: Callable[[int], None]) -> Callable[[], None]:
        """Call *handler(signum)* on SIGTERM and SIGINT (main thread only); return the undo."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.signal(sig, lambda signum, frame: handler(signum))
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        previous_fd = signal.set_wakeup_fd(self._write)

        def restore():
            for sig, old in previous.items():
                signal.signal(sig, old)
            signal.set_wakeup_fd(previous_fd)

        return restore

    def close(self) -> None:
        self.selector.close()
        for fd in (self._read, self._write):
            os.close(fd)
