"""Seeded work that leaves the caller's random streams where they were.

``torch.manual_seed`` reseeds *every* device (it calls ``torch.cuda.manual_seed_all``), and
``torch.random.fork_rng(devices=[])`` restores only the CPU generator, so the pair moves the
caller's CUDA stream on a GPU. :func:`seeded_fork` forks the CPU generator and the one CUDA
device in use, and seeds exactly those.
"""

from __future__ import annotations

# The reference run and the TRL integration draw each step's randomness from a generator seeded by
# (seed, step), and the held-out batch of that step from another stream offset by this constant.
HELDOUT_STREAM = 0x5DEECE66D
# The random signs of occ_control=random_sign: one stream per update, apart from training's.
SIGN_STREAM = 0x2545F4914F6CDD1D

import numbers
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def cuda_index(device: torch.device | str | None) -> int | None:
    """The CUDA device index of ``device`` (the current device for a bare ``"cuda"``), or
    ``None`` when ``device`` is not a CUDA device."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.current_device() if device.index is None else device.index


@contextmanager
def seeded_fork(seed: int | None, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the body with the CPU generator (and ``device``'s generator if it is a CUDA device)
    forked and, unless ``seed`` is ``None``, seeded with ``seed``; both are restored on exit.

    Other devices' generators are neither seeded nor touched, so the body must draw random
    numbers only on the CPU and on ``device``.
    """
    if seed is not None and not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer or None, got {type(seed).__name__}")
    index = cuda_index(device)
    devices = [] if index is None else [index]
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        if seed is not None:
            torch.default_generator.manual_seed(int(seed))
            if index is not None:
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(int(seed))
        yield


def stream_seed(seed: int, step: int, offset: int = 0) -> int:
    """The seed of step ``step``'s generator: one independent, reproducible stream per
    ``(seed, step)`` (so resuming needs no RNG state); ``offset`` selects another stream of the
    same step (e.g. ``HELDOUT_STREAM``)."""
    return (seed * 1_000_003 + step * 7_919 + 17 + offset) % (2**63 - 1)
