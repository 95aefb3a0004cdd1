"""One error type for bad input, so every entry point can print it as a single line."""

import threading


class ConfigError(ValueError):
    """Bad user input: the message names the bad value and what was expected.

    The command line prints ``error: <message>`` and exits with status 2 instead of a traceback.
    """


def check(cond: object, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``cond`` is truthy.

    ``cond`` is tested for truthiness, so a non-empty string or list counts as holding.
    """
    if not cond:
        raise ConfigError(message)


STOP = threading.Event()
"""Set by the runner's SIGINT/SIGTERM handler. The KeyboardInterrupt it raises can be swallowed
when the signal lands inside a finaliser (Python prints "Exception ignored" and goes on), so the
trainer and the cell loop also check this between chunks and cells and stop there."""


def stop_if_requested() -> None:
    if STOP.is_set():
        raise KeyboardInterrupt
