"""Errors a user can fix: one line that names the problem and the fix, exit code 2."""


class SemiPruneError(Exception):
    """Bad input or configuration. ``str(err)`` is one line meant for the user.

    Command-line entry points catch it, print ``error: <message>`` and exit with ``exit_code``.
    """

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        message = problem if fix is None else f"{problem}; {fix}"
        super().__init__(" ".join(message.split()))


class ConfigError(SemiPruneError):
    """A params file or override is wrong (unknown key, wrong type, out of range)."""


class DataError(SemiPruneError):
    """A dataset is missing, truncated, corrupt or inconsistent."""


class WorkspaceBusy(SemiPruneError):
    """Another run holds the workspace. Not bad input: exit 75 (EX_TEMPFAIL, "try again later")."""

    exit_code = 75
