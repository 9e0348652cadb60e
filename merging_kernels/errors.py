"""Exceptions raised by merging_kernels."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here (not built, no GPU, no triton)."""
