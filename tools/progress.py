"""One channel for the progress of long work.

Library code reports steps with :func:`report` and never draws anything; whoever runs the work
(the CLI, a notebook) listens for the duration of a call with :func:`listening`. The listener is
scoped to the calling context, so concurrent compiles do not see each other's progress.

    with progress.listening(lambda stage, done, total: ...):
        hessc.optimize(...)
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

Listener = Callable[[str, int, int], None]
"""``listener(stage, done, total)``: ``stage`` names the work (``covariance``, ``quantize``, ...),
``done`` of ``total`` units are finished."""

_listener: contextvars.ContextVar[Listener | None] = contextvars.ContextVar("hessc.progress", default=None)


def report(stage: str, done: int, total: int) -> None:
    """Tells the current listener, if any, that ``done`` of ``total`` units of ``stage`` are finished."""
    listener = _listener.get()
    if listener is not None:
        listener(stage, done, total)


@contextlib.contextmanager
def listening(listener: Listener | None) -> Iterator[None]:
    """Sends the progress reported inside the ``with`` block to ``listener`` (None: to nobody)."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)
