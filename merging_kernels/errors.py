"""Exceptions raised by merging_kernels."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here (not built, no GPU, no triton)."""


class NativeBuildWarning(UserWarning):
    """Installing could not compile all of ``_C``; filter this category to silence the import warning."""
