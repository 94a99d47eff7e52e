"""Shared timing helpers of the benchmarks: wall time of a call, best of repeats, matmul peak."""

from __future__ import annotations

import time

import torch


def timed(fn) -> float:
    """Seconds one call of `fn` takes."""
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def best_of(fn, repeats: int = 3) -> float:
    """Fastest of `repeats` timed calls after one warm-up call (the least disturbed by other work)."""
    fn()
    return min(timed(fn) for _ in range(repeats))


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of an n³ matmul, best of `repeats`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_of(lambda: a @ b, repeats)
