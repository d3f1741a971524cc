"""Reproducible seeds per (run seed, step, rank, stream): how a resumed run draws what the uninterrupted one drew."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """A distinct, reproducible 63-bit seed for (seed, step, rank, stream)."""
    x = (seed * 1_000_003 + step) * 65_537 + rank * 257 + stream
    x = (x ^ (x >> 31)) * 0x9E3779B97F4A7C15 % (1 << 63)
    return int(x)


class MicroBatchRNG:
    """torch's global random stream of one update step, one per micro-batch of the global batch.

    Micro-batch `i` of this process draws its noise from the stream torch.manual_seed(step_seed(seed, step, g))
    starts, where g = `indices[i]` is its index in the step's global batch. The stream carries on across the
    step's updates (critic updates, then the generator update) as one torch.manual_seed at the start of the step
    would, so a process with one micro-batch draws exactly what it drew before streams were kept per micro-batch.
    """

    def __init__(self, seed: int, step: int, indices: list[int], device: torch.device):
        self._cuda = device.type == "cuda"
        self._states = []
        for g in indices:
            torch.manual_seed(step_seed(seed, step, g))
            self._states.append(self._capture())

    def _capture(self):
        return torch.get_rng_state(), (torch.cuda.get_rng_state() if self._cuda else None)

    @contextlib.contextmanager
    def micro(self, i: int) -> Iterator[None]:
        """Draw micro-batch `i`'s noise inside this block."""
        cpu, cuda = self._states[i]
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
        try:
            yield
        finally:
            self._states[i] = self._capture()


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """torch's global random stream started from `seed` inside the block, and the process's own stream put back
    after it. What a k-step rollout draws inside (its re-noising, `torch.randn_like`) is then fixed by `seed`, not
    by whatever the process drew before: the same student scored by two scripts, or twice in one run, draws the
    same noise, and a training run that scores along the way trains on as if it had not."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def renoise_seed(seed: int) -> int:
    """The seed of a k-step rollout's re-noising when its starting noise comes from torch.Generator().manual_seed(
    seed): another stream, since the same seed would re-noise each step with the starting noise itself."""
    return step_seed(seed, 0, 0, stream=1)


def seeded_renoising(seed: int, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager[None]:
    """`seeded(renoise_seed(seed), device)`: a k-step rollout whose starting noise comes from
    torch.Generator().manual_seed(seed) draws its re-noising inside this block from `seed` too, so what it samples
    is a function of the network and `seed` alone."""
    return seeded(renoise_seed(seed), device)
