"""Reproducible seeds per (run seed, step, rank, stream): how a resumed run draws what the uninterrupted one drew."""

from __future__ import annotations


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """A distinct, reproducible 63-bit seed for (seed, step, rank, stream)."""
    x = (seed * 1_000_003 + step) * 65_537 + rank * 257 + stream
    x = (x ^ (x >> 31)) * 0x9E3779B97F4A7C15 % (1 << 63)
    return int(x)
