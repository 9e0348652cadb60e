"""The one rule for progress bars in library calls."""

from __future__ import annotations


def tqdm_disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a ``progress`` argument: True/False as given; None shows bars only on a terminal.

    (tqdm's own ``disable=None`` means "off when the stream is not a TTY": a library call inside a script whose
    stderr goes to a log file should not fill it with bar updates.)
    """
    if progress is None:
        return None
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {type(progress).__name__}")
    return not progress
