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


class NoiseStream:
    """Gaussian and uniform draws for samples start..start + n - 1 of a sampling job, each sample's the same
    whatever the batches: draw k (x_T is draw 0, a sampler's noise draws 1, 2, ...) of sample i comes from a
    generator seeded by (seed, k, i // BLOCK), so a batch regenerates only the blocks of BLOCK samples it
    overlaps. Samplers accept it where they take a torch.Generator (`samplers.randn_like`)."""

    BLOCK = 1024

    def __init__(self, seed: int, start: int, n: int, device: torch.device | str = "cpu"):
        self.seed, self.start, self.n, self.device = seed, start, n, torch.device(device)
        self.draw = 0

    def _blocks(self, rest: tuple[int, ...], dtype: torch.dtype, uniform: bool) -> torch.Tensor:
        first, last = self.start // self.BLOCK, (self.start + self.n - 1) // self.BLOCK
        parts = []
        for b in range(first, last + 1):
            seed = int(np.random.SeedSequence([self.seed, self.draw, b]).generate_state(1, dtype=np.uint64)[0]) >> 1
            g = torch.Generator(device=self.device).manual_seed(seed)
            fn = torch.rand if uniform else torch.randn
            parts.append(fn((self.BLOCK, *rest), generator=g, device=self.device, dtype=dtype))
        self.draw += 1
        offset = self.start - first * self.BLOCK
        return torch.cat(parts)[offset:offset + self.n]

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if shape[0] != self.n:
            raise ValueError(f"a NoiseStream for {self.n} samples was asked for shape {tuple(shape)}")
        return self._blocks(tuple(shape[1:]), dtype, uniform=False)

    def rand(self, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """n uniform numbers in [0, 1), one per sample."""
        if n != self.n:
            raise ValueError(f"a NoiseStream for {self.n} samples was asked for {n} numbers")
        return self._blocks((), dtype, uniform=True)
