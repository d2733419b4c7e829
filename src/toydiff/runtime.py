"""Device, threads and seeds: resolved once, at the edge, and passed down explicitly."""

from __future__ import annotations

import zlib

import numpy as np
import torch

from .errors import ToydiffError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu; anything else is checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ToydiffError(f"unknown device '{name}'; choose one of: auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ToydiffError(f"device '{name}' was asked for but CUDA is not available here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ToydiffError(f"device '{name}' was asked for but MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ToydiffError(f"unsupported device '{name}'; choose one of: auto, cpu, cuda, cuda:N, mps")
    return device


def set_threads(threads: int, device: torch.device) -> int:
    """Set torch's intra-op threads. 0 = auto: 1 on the CPU, where the small networks toydiff trains
    ran 10-100x slower with 2 threads than with 1 (thread hand-off costs more than the math);
    on a GPU the CPU threads do not matter and are left alone."""
    if threads == 0:
        if device.type != "cpu":
            return torch.get_num_threads()
        threads = 1
    torch.set_num_threads(threads)
    return threads


def derive_seed(seed: int, purpose: str) -> int:
    """An independent 63-bit seed for one purpose ('data', 'init', 'train', 'sample', ...) of a run."""
    state = np.random.SeedSequence([seed, zlib.crc32(purpose.encode())]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def torch_generator(seed: int, purpose: str, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, purpose))


def numpy_rng(seed: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, purpose))
