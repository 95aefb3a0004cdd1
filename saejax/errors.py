"""One error type for bad input, so every entry point can print it as a single line."""


class ConfigError(ValueError):
    """Bad user input: the message names the bad value and what was expected.

    The command line prints ``error: <message>`` and exits with status 2 instead of a traceback.
    """


def check(cond: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(message)
