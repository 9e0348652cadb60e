"""Exceptions raised by merging_kernels."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here (not built, no GPU, no triton)."""


class MergeOverflowError(ValueError):
    """A merge's result is NaN or ±inf in the output dtype where the base is finite there (or is the other
    infinity there, e.g. a -1e9 mask a float16 output makes -inf, merged to +inf): the combination overflowed
    float32, or the merged values lie beyond a 16-bit output's range (``check_finite=False`` keeps them)."""


class NativeBuildWarning(UserWarning):
    """Installing could not compile all of ``_C``; filter this category to silence the import warning."""
