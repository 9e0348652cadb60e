"""Merging methods: algorithms written with the ops, never with kernels of their own."""

from .mudsc import (MuDSCResult, activation_matching_merge, average_merge, mudsc_merge, reset_batchnorm,
                    weight_matching_merge, zipit_merge)
from .repair import repair, repair_producers
from .se_merging import SEMergedModel, se_merge
from .task_vectors import dare_merging, task_arithmetic, ties_merging

__all__ = ["MuDSCResult", "activation_matching_merge", "average_merge", "dare_merging", "mudsc_merge", "repair",
           "repair_producers", "reset_batchnorm", "SEMergedModel", "se_merge",
           "task_arithmetic", "ties_merging", "weight_matching_merge", "zipit_merge"]
