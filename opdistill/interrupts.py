"""One interrupt handler: SIGTERM (a scheduler's stop, `kill`) takes the same path as Ctrl-C.

Every command commits what it has when interrupted (collect and eval: each line as it arrives; train: a
checkpoint) and a rerun continues, so both signals simply raise KeyboardInterrupt where the work is.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


def raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt; the previous handler comes back after it. Signal
    handlers can only be set from the main thread, so elsewhere (a thread running the API) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
