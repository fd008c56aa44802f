"""Errors that the command line reports as one line (no traceback)."""


class OvsdError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ParityError(OvsdError):
    """An exported component disagrees with its PyTorch original."""
