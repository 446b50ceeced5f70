"""Errors whose message is one line meant for the user (the CLI prints it as is)."""


class SSLSuiteError(Exception):
    """Base class: ``str(err)`` is a single line naming what was wrong."""


class CheckpointError(SSLSuiteError):
    """A checkpoint that cannot be read or written."""


class NonFiniteLossError(SSLSuiteError):
    """Training produced a NaN or infinite loss."""
