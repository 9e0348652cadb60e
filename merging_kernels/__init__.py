"""merging_kernels: GPU/CPU kernels for model merging under a thin PyTorch API."""

from ._dispatch import BACKENDS, available_backends
from ._native import build_info, native_error
from .errors import BackendUnavailableError, MergeOverflowError, NativeBuildWarning
from .methods import dare_merging, mudsc_merge, se_merge, task_arithmetic, ties_merging
from .ops.linear_assignment import check_assignment, linear_sum_assignment
from .ops.per_sample_linear import pack_weights, per_sample_linear
from .ops.similarity import ActivationStats, correlation_matrix, dual_similarity, group_similarity
from .ops.task_vectors import magnitude_thresholds, merge_task_vectors, streamed_magnitude_thresholds

__version__ = "0.1.0"

__all__ = [
    "ActivationStats",
    "BACKENDS",
    "BackendUnavailableError",
    "MergeOverflowError",
    "NativeBuildWarning",
    "available_backends",
    "build_info",
    "check_assignment",
    "correlation_matrix",
    "dare_merging",
    "dual_similarity",
    "group_similarity",
    "linear_sum_assignment",
    "magnitude_thresholds",
    "merge_task_vectors",
    "mudsc_merge",
    "native_error",
    "pack_weights",
    "per_sample_linear",
    "se_merge",
    "streamed_magnitude_thresholds",
    "task_arithmetic",
    "ties_merging",
]
