"""Ops: one file per op, each with its PyTorch reference (the CPU path) next to its kernels."""
