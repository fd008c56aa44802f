"""Errors that the command line reports as one line (no traceback)."""


class OvsdError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ParityError(OvsdError):
    """An exported component disagrees with its PyTorch original."""


def reason_of(error: BaseException) -> str:
    """The first line of a library's error message (or its type when it has none), to quote in one-line errors:
    library messages often run on for pages."""
    text = str(error)
    return text.splitlines()[0] if text.strip() else type(error).__name__


class InvalidRequest(OvsdError, ValueError):
    """An invalid value in a generation request: a ValueError, as diffusers raises for its own checks, so code
    that catches diffusers' validation errors catches ovsd3's."""
