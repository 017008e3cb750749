"""Errors a user can act on.

`FedtuneError` and its subclasses carry a message meant for a person; the CLI
prints it without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Sequence


class FedtuneError(Exception):
    """A user-facing error: bad configuration, missing file, malformed payload."""


class ConfigError(FedtuneError, ValueError):
    """A configuration key or value is wrong; the message names the key.

    Built from one message, or from a list of problems (each ``section.key: why
    (got value)``), which ``problems`` keeps so that callers can merge the
    problems of several sections into one error.
    """

    def __init__(self, problems: str | Sequence[str]) -> None:
        if isinstance(problems, str):
            self.problems: tuple[str, ...] = (problems,)
            message = problems
        else:
            self.problems = tuple(problems)
            message = "invalid configuration:\n  " + "\n  ".join(self.problems)
        super().__init__(message)


class PayloadError(FedtuneError, ValueError):
    """A client or server payload is malformed; the update is dropped, the run goes on."""
