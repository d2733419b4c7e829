"""Device, threads and seeds: resolved once, at the edge, and passed down explicitly; the torchrun process group.

What the machine itself offers (cores, memory, the cache folder) is toydiff.core.machine's.
"""

from __future__ import annotations

import datetime
import os
import sys
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
    """Set torch's intra-op threads; 0 = auto: one thread on the CPU, left alone on a GPU.

    Measured (benchmarks/speed.py, "threads under load", a 2-core machine, the default MLP): on an idle
    machine 2 threads made a training step up to 1.5x faster at 1024-4096 rows, but with one other busy
    process on the machine they made it 1.6-3.6x slower (OpenMP threads waiting on a core they do not get;
    10x was seen elsewhere). The small gain is not worth the trap, so auto never takes it; set
    train.threads on a machine that is yours alone."""
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
    whatever the batches. The job's samples are cut into blocks of BLOCK; block b has its own generator,
    seeded (base + b) mod 2^32 with base from SeedSequence(seed), and every draw (x_T first, then a sampler's
    noise, ...) takes the next BLOCK rows from it, so a batch regenerates only the blocks it overlaps.
    Samplers accept it where they take a torch.Generator (`samplers.randn_like`).

    Why consecutive seeds rather than one hashed seed per (draw, block): torch's CPU generator keeps only
    the low 32 bits of a seed, so hashed seeds meet by the birthday bound (in a 1e7-sample, 1000-step job
    about 10^4 pairs of (draw, block) would have drawn the same noise); here no two blocks of a job share
    a seed up to 2^32 blocks, and a job seeds one generator per block instead of one per draw and block.

    A block is BLOCK samples on the CPU and CUDA_BLOCK on a GPU, where each draw is a kernel launch that costs
    the same for 1,024 or 65,536 rows: a batch of 2^20 samples takes 16 launches per draw there, not 1,024.
    (CPU and CUDA generators differ anyway, so a seed gives other samples on a GPU than on the CPU.)"""

    BLOCK = 1024
    CUDA_BLOCK = 65536

    def __init__(self, seed: int, start: int, n: int, device: torch.device | str = "cpu"):
        self.seed, self.start, self.n, self.device = seed, start, n, torch.device(device)
        self.block = self.CUDA_BLOCK if self.device.type == "cuda" else self.BLOCK
        first, last = start // self.block, (start + n - 1) // self.block
        base = int(np.random.SeedSequence([seed, zlib.crc32(b"noise-blocks")]).generate_state(1)[0])
        self._generators = [torch.Generator(device=self.device).manual_seed((base + b) % 2**32)
                            for b in range(first, last + 1)]
        self._offset = start - first * self.block

    def _next(self, rest: tuple[int, ...], dtype: torch.dtype, uniform: bool) -> torch.Tensor:
        fn = torch.rand if uniform else torch.randn
        parts = [fn((self.block, *rest), generator=g, device=self.device, dtype=dtype) for g in self._generators]
        whole = parts[0] if len(parts) == 1 else torch.cat(parts)
        return whole[self._offset:self._offset + self.n]

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if shape[0] != self.n:
            raise ValueError(f"a NoiseStream for {self.n} samples was asked for shape {tuple(shape)}")
        return self._next(tuple(shape[1:]), dtype, uniform=False)

    def rand(self, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """n uniform numbers in [0, 1), one per sample."""
        if n != self.n:
            raise ValueError(f"a NoiseStream for {self.n} samples was asked for {n} numbers")
        return self._next((), dtype, uniform=True)


class World:
    """The processes training together (torchrun / DistributedDataParallel), or just this one.

    Every rank draws the same global batch from the same generator and trains on its own contiguous shard of
    it, so the averaged gradient is the single-process gradient of that batch; rank 0 alone writes files."""

    def __init__(self, rank: int = 0, size: int = 1):
        self.rank, self.size = rank, size

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def check_batch(self, batch: int) -> None:
        """A global batch the processes can share evenly, or a one-line error."""
        if batch % self.size:
            raise ToydiffError(f"the global batch ({batch}) must be divisible by the {self.size} processes; "
                               "change train.batch_size")

    def check_networks(self, names) -> None:
        """Only the run's own network is wrapped for DistributedDataParallel: a method that trains several (a
        critic beside the model) is refused under torchrun."""
        if self.size > 1 and len(names) > 1:
            raise ToydiffError(f"a method that trains several networks ({', '.join(names)}) cannot run under "
                               "torchrun yet; train it in one process")

    def shard(self, n: int) -> slice:
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' equal-size tensors concatenated in rank order (on every rank)."""
        if self.size == 1:
            return x
        import torch.distributed as dist
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def close(self) -> None:
        """Wait for every rank, then leave the process group (a rank that exits with it open can abort). A rank
        other than 0 then ends its process at once: its work is done (rank 0 alone writes), and letting the
        interpreter tear down after gloo still aborted it now and then ("terminate called without an active
        exception", exit -6, so torchrun failed a complete run: 3 of 14 two-process runs on a loaded machine
        here, 0 of 14 with this exit)."""
        if self.size == 1:
            return
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        if not self.is_writer:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    def any(self, flag: bool) -> bool:
        """Whether any rank's flag is set (every rank gets the same answer)."""
        if self.size == 1:
            return flag
        import torch.distributed as dist
        x = torch.tensor([float(flag)])
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return bool(x.item())

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        import torch.distributed as dist
        x = x.clone()
        dist.all_reduce(x)
        return x / self.size


COLLECTIVE_TIMEOUT = 300  # seconds a rank waits in a collective for the others (gloo's own default is 30 min)


def collective_timeout() -> float:
    """Seconds before a collective gives up on a rank that died or froze: COLLECTIVE_TIMEOUT, or the environment's
    TOYDIFF_COLLECTIVE_TIMEOUT."""
    raw = os.environ.get("TOYDIFF_COLLECTIVE_TIMEOUT", "")
    try:
        value = float(raw) if raw else COLLECTIVE_TIMEOUT
    except ValueError:
        value = -1
    if not 0 < value < 1e7:
        raise ToydiffError(f"TOYDIFF_COLLECTIVE_TIMEOUT must be a number of seconds > 0, got '{raw}'")
    return value


def init_world(device: str = "auto") -> tuple[World, str]:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1): gloo on the CPU, NCCL on
    GPUs, one GPU per process (LOCAL_RANK). Returns the world and the device this process trains on."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    elif device == "auto":
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=collective_timeout()))
    return World(dist.get_rank(), dist.get_world_size()), device
