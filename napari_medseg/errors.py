"""The one error type for problems a user can act on."""

from __future__ import annotations

__all__ = ["MedSegError", "Cancelled", "check_cancel"]


class MedSegError(Exception):
    """A problem the user can fix, with a message that says what and where.

    The message names the file or layer involved and what to do about it. GUI
    code shows it as a napari notification; the CLI prints it as one line and
    exits non-zero. Anything else that escapes is a bug.

    Parameters
    ----------
    message : str
        What went wrong and what to do.
    source : str, optional
        The file path or layer name the problem is about; prefixed to the message
        when it is not already mentioned there.
    """

    def __init__(self, message: str, source: str | None = None):
        self.source = None if source is None else str(source)
        if self.source and self.source not in message:
            message = f"{self.source}: {message}"
        super().__init__(message)


class Cancelled(Exception):
    """Raised inside long operations when the user asked to stop.

    Long functions take ``cancel: Callable[[], bool] | None`` and check it
    between steps; on cancel they clean up (no partial output) and raise this.
    """


def check_cancel(cancel) -> None:
    """Raise :class:`Cancelled` when ``cancel`` (a callable or Event) says so."""
    if cancel is None:
        return
    flag = cancel.is_set() if hasattr(cancel, "is_set") else cancel()
    if flag:
        raise Cancelled()
