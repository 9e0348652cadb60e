"""Op families: each module holds its torch reference, its kernels and its dispatch."""
