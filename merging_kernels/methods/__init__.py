"""Merging methods: algorithms written with the ops, never with kernels of their own."""

from .task_vectors import dare_merging, task_arithmetic, ties_merging

__all__ = ["dare_merging", "task_arithmetic", "ties_merging"]
