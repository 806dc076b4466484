"""Triton kernels and their launch helpers only (no autograd, no transformers)."""
