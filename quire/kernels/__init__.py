"""Compiled kernels for the hot path, each optional: callers fall back to pure torch without them."""
